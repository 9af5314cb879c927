"""Importing the PyTorch peers (pytorch-fid, torch-fidelity) that the FID tests compare against.

Both import torchvision for its Inception blocks (pure Python), through
`benchmarks.torch_reference.import_torchvision`, which copes with PyPI's torchvision beside torch's
CPU wheel (two detection ops defined as placeholders; nothing here calls them, and the Inception
code the tests run is torchvision's and pytorch-fid's own). A peer that is not installed skips the
test with the reason.

`random_fid_state_dict()`: pytorch-fid's network's state dict with random values, which
`torch.save` writes as a file in the format of pytorch-fid's weights file (the published weights
cannot be downloaded here, and the tests need none).
"""
import importlib
import itertools
import math

import pytest

from benchmarks.torch_reference import import_torchvision

def import_peer(module: str):
    """`module` (e.g. 'pytorch_fid.inception'), importing torch and torchvision first; skips the
    calling test if the peer is not installed (`pip install -e ".[dev]"` installs them)."""
    pytest.importorskip("torch", reason="the PyTorch peers need torch (installed by .[dev])")
    if module.split(".")[0] != "torch":
        import_torchvision()
    top = module.split(".")[0]
    pytest.importorskip(top, reason=f"{top} is not installed (installed by .[dev])")
    return importlib.import_module(module)


def random_fid_state_dict(seed=0):
    """pytorch-fid's `fid_inception_v3()` state dict (built offline) with random values.

    Convs are He-normal and BatchNorm's running mean ~ N(0, 0.1²), running var ~ U(0.5, 1.5),
    scale ~ U(0.5, 1.5), bias ~ N(0, 0.1²), so that activations stay O(1) through the network;
    the fc is N(0, 1/2048) with a N(0, 1) bias (so that 'logits' and 'logits_unbiased' differ).
    """
    pytorch_fid = import_peer("pytorch_fid.inception")
    import torch
    with pytest.MonkeyPatch.context() as patch:  # fid_inception_v3 downloads and loads weights
        patch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(torch.nn.Module, "load_state_dict", lambda self, *args, **kwargs: None)
        net = pytorch_fid.fid_inception_v3()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in itertools.chain(net.named_parameters(), net.named_buffers()):
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("conv.weight"):
                t.normal_(0.0, math.sqrt(2.0 / t[0].numel()), generator=g)
            elif name.endswith(("bn.weight", "running_var")):
                t.uniform_(0.5, 1.5, generator=g)
            elif name.endswith(("bn.bias", "running_mean")):
                t.normal_(0.0, 0.1, generator=g)
            elif name == "fc.weight":
                t.normal_(0.0, 2048 ** -0.5, generator=g)
            elif name == "fc.bias":
                t.normal_(0.0, 1.0, generator=g)
            else:
                raise AssertionError(f"unexpected parameter {name}")
    return net.state_dict()
