"""Data: random-access image sources and host-sharded grain pipelines of uint8 batches.

    source = load_source("digits16", "train")      # or "tfds:cifar10", "images:/x.zip", ...
    batches = train_iterator(source, global_batch_size=128, seed=0)
    state = batches.get_state()                     # a JSON-able dict; set_state(state) resumes
"""
from vdm_jax._extras import require_train_extra

require_train_extra("vdm_jax.data", "grain", "PIL")

from vdm_jax.data.array_source import ArraySource
from vdm_jax.data.cifar10_python import CIFAR10_CLASSES, read_cifar10_python
from vdm_jax.data.digits import load_digits
from vdm_jax.data.image_files import ImageFilesSource
from vdm_jax.data.load import SPECS, FirstExamples, load_source
from vdm_jax.data.npz import read_npz
from vdm_jax.data.pipeline import eval_iterator, num_eval_batches, train_iterator
from vdm_jax.data.tfds_source import TfdsSource
from vdm_jax.data.validation import DataNotFoundError, check_image, check_source

__all__ = [
    "ArraySource",
    "CIFAR10_CLASSES",
    "DataNotFoundError",
    "FirstExamples",
    "ImageFilesSource",
    "SPECS",
    "TfdsSource",
    "check_image",
    "check_source",
    "eval_iterator",
    "num_eval_batches",
    "load_digits",
    "load_source",
    "read_cifar10_python",
    "read_npz",
    "train_iterator",
]
