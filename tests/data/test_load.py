"""Tests for vdm_jax.data.load.load_source: each spec string opens the right source."""
import numpy as np
import pytest

from vdm_jax.data import ArraySource, ImageFilesSource, load_source


def test_specs(cifar_tar, npz_file, image_zip, image_folder):
    cases = [
        (f"cifar10_tar:{cifar_tar[0]}", "test", ArraySource, 3, (32, 32, 3)),
        (f"npz:{npz_file[0]}", "train", ArraySource, 10, (8, 6, 3)),
        (f"images:{image_zip}", "train", ImageFilesSource, 5, (8, 6, 3)),
        (f"images:{image_folder}", "test", ImageFilesSource, 3, (8, 6, 3)),
        ("digits", "train", ArraySource, 1500, (8, 8, 1)),
        ("digits16", "test", ArraySource, 297, (16, 16, 1)),
    ]
    for spec, split, kind, length, shape in cases:
        source = load_source(spec, split)
        assert isinstance(source, kind), spec
        assert len(source) == length, spec
        assert source[0]["image"].shape == shape, spec


@pytest.mark.parametrize("spec", ["cifar10", "npz:", "tfds:", "digits32", "hf:cifar10"])
def test_unknown_spec_names_the_valid_ones(spec):
    with pytest.raises(ValueError, match=r"unknown data spec .*valid forms: tfds:NAME, "
                                         r"tfds:NAME@DATA_DIR, cifar10_tar:PATH, npz:PATH, "
                                         r"images:PATH, digits, digits16"):
        load_source(spec, "train")


def test_unknown_split_names_the_valid_ones(cifar_tar):
    with pytest.raises(ValueError, match=r"valid: \['test', 'train'\]"):
        load_source("digits16", "val")
    with pytest.raises(ValueError, match=r"valid: \['test', 'train'\]"):
        load_source(f"cifar10_tar:{cifar_tar[0]}", "val")


@pytest.mark.parametrize("spec, split, match", [(None, "train", "spec must be a string, got None"),
                                                ("digits", 0, "split must be a string, got 0")])
def test_spec_and_split_must_be_strings(spec, split, match):
    with pytest.raises(TypeError, match=match):
        load_source(spec, split)


def test_first_examples():
    from vdm_jax.data import FirstExamples
    source = load_source("digits", "test")
    head = FirstExamples(source, 5)
    assert len(head) == 5 and np.array_equal(head[4]["image"], source[4]["image"])
    with pytest.raises(IndexError):
        head[5]
    assert len(FirstExamples(source, 10_000)) == len(source)
    with pytest.raises(ValueError, match="n must be a positive int, got 0"):
        FirstExamples(source, 0)
