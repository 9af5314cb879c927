"""benchmarks/torch_reference.py's `Peer`: the PyTorch reference in a process of its own."""
import os

import pytest

from benchmarks.torch_reference import Peer, PeerError
from vdm_jax.models import count_params, tiny

CONFIG = tiny(image_size=8, in_channels=1, embedding_dim=24, dropout=0.0)


def _peer(**changes):
    settings = dict(params=count_params(CONFIG), batch=4, sample_batch=1, sample_steps=10, train_steps=2)
    return Peer(CONFIG.to_dict(), **{**settings, **changes})


def test_a_failing_peer_raises_with_its_own_error():
    """The peer checks the parameter count (or lacks diffusers): either way one PeerError with the
    peer's last lines, and no process left behind."""
    with pytest.raises(PeerError, match="parameter counts differ|No module named 'diffusers'") as info:
        _peer(params=1)
    assert "the PyTorch process exited (1)" in str(info.value)


@pytest.mark.slow(20)
def test_the_peer_measures_in_its_own_process():
    pytest.importorskip("diffusers", reason="the PyTorch reference needs diffusers (pip install -e '.[bench]')")
    with _peer() as peer:
        assert peer.info["params"] == count_params(CONFIG) and peer.info["pid"] != os.getpid()
        train = peer.call("train")
        sample = peer.call("sample")
        matmul = peer.call("matmul")
    assert train["step_s"] > 0 and sample["chain_s"] > 0 and matmul["flops_per_s"] > 1e8
    assert peer._proc.returncode == 0
