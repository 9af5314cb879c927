"""Tests for vdm_jax.models.inception and inception_weights: the FID Inception network against
pytorch-fid's (the same random weights; jax.jit against torch's eval mode), the safe reader of
torch.save files against torch.load, the weights loader's cache, hash and download paths, and
the input checks.

The network costs ~6 GFLOP per image at 299×299, so each case runs 2 images through one jitted
function shared by the module (one compiled program per input shape).
"""
import os
import pickle
import shutil
import urllib.error
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm_jax.models import inception_weights
from vdm_jax.models.inception import (
    FIDInception,
    fid_inception_from_weights,
    resize_bilinear,
    to_unit_interval,
)
from vdm_jax.models.inception_weights import (
    FID_WEIGHTS_FILE,
    FID_WEIGHTS_URL,
    fid_inception,
    load_fid_inception_weights,
    read_torch_state_dict,
)


def _rel(got, ref):
    """max |got - ref| / max |ref|."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def jitted_model(fid_weights, tmp_path_factory):
    """(fn, state): FIDInception on the fixture's weights as one jitted `fn(state, images)`."""
    path, _ = fid_weights
    graphdef, state = nnx.split(fid_inception(path, cache_dir=tmp_path_factory.mktemp("cache")))
    return jax.jit(lambda state, images: nnx.merge(graphdef, state)(images)), state


# --------------------------------------------------------------------------------------------
# The network against pytorch-fid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 341, 512, 3)], ids=["32x32-up", "341x512-down"])
def test_features_match_pytorch_fid(shape, fid_weights, jitted_model):
    import torch
    path, torch_model = fid_weights
    images = np.random.default_rng(shape[1]).random(shape, dtype=np.float32)
    with torch.no_grad():
        ref_pool = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))[0].flatten(1).numpy()
    weights = torch.load(path, weights_only=True)
    fc_w, fc_b = weights["fc.weight"].numpy(), weights["fc.bias"].numpy()
    ref = {"pool": ref_pool, "logits": ref_pool @ fc_w.T + fc_b, "logits_unbiased": ref_pool @ fc_w.T}
    fn, state = jitted_model
    got = {k: np.asarray(v) for k, v in fn(state, images).items()}
    assert set(got) == set(ref)
    for key in ref:
        assert got[key].shape == ref[key].shape and got[key].dtype == np.float32
        assert _rel(got[key], ref[key]) < 1e-4, (key, _rel(got[key], ref[key]))
    assert np.std(ref_pool) > 0.1  # the random weights give non-trivial features
    assert _rel(got["logits"], got["logits_unbiased"]) > 0.1


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    for shape in [(1, 32, 32, 3), (1, 341, 512, 3), (1, 7, 300, 3)]:
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                            align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(jax.jit(resize_bilinear)(x)), ref, rtol=0, atol=1e-6)


def test_vmaps_and_traces_into_jit(jitted_model):
    fn, state = jitted_model
    images = jax.ShapeDtypeStruct((3, 2, 32, 32, 3), jnp.float32)  # vmapped over a leading axis
    out = jax.eval_shape(jax.vmap(fn, in_axes=(None, 0)), state, images)
    assert {k: v.shape for k, v in out.items()} == {
        "pool": (3, 2, 2048), "logits": (3, 2, 1008), "logits_unbiased": (3, 2, 1008)}


# --------------------------------------------------------------------------------------------
# read_torch_state_dict against torch.load
# --------------------------------------------------------------------------------------------


def _save(obj, path, fmt):
    import torch
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"))
    return path


def _assert_same(got, ref):
    assert list(got) == list(ref)
    for name, tensor in ref.items():
        tensor = tensor.detach()
        want = tensor.float().numpy().astype(got[name].dtype) if str(tensor.dtype) == "torch.bfloat16" \
            else tensor.numpy()
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].flags.c_contiguous, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_matches_torch_load_on_pytorch_fid_weights(fmt, fid_weights, tmp_path):
    import torch
    path, _ = fid_weights
    if fmt == "legacy":  # the published file (2019) predates torch's zip format
        path = _save(torch.load(path, weights_only=True), tmp_path / "legacy.pth", fmt)
    _assert_same(read_torch_state_dict(path), torch.load(path, weights_only=True))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_reader_handles_views_offsets_and_dtypes(fmt, pytorch_fid, tmp_path):
    import torch
    big = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {
        "transposed": big.T,  # strides (1, 10)
        "slice": big[1:4, 2:9:3],  # an offset into a shared storage, strides (10, 3)
        "row": big[5],  # offset 50, contiguous
        "scalar": torch.tensor(7, dtype=torch.int64),
        "half": torch.linspace(-2, 2, 5, dtype=torch.float16),
        "bfloat16": torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
        "double": torch.randn(2, 3, dtype=torch.float64),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(torch.ones(2, 2)),
    }
    path = _save(state, tmp_path / "views.pt", fmt)
    _assert_same(read_torch_state_dict(path), torch.load(path, weights_only=True))


class _Exploit:
    """Pickles as a call of os.system (posix.system) that would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["torch_zip", "torch_legacy", "pickle_in_zip", "plain_pickle"])
def test_reader_refuses_code_without_running_it(how, tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "exploit.pt"
    payload = {"weight": _Exploit(marker)}
    if how.startswith("torch"):
        pytest.importorskip("torch")
        _save(payload, path, how.removeprefix("torch_"))
    elif how == "pickle_in_zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing the global posix\.system"):
        read_torch_state_dict(path)
    assert not marker.exists()


def _crafted_state_dict(path, size, stride, offset=0, numel=4, build=b""):
    """A zip like torch's holding {'w': a float32 tensor (size, stride, offset) of a storage of
    `numel` elements}, its pickle written opcode by opcode (`build`: opcodes run on the storage
    type's global before use)."""
    def text(s):
        return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()  # BINUNICODE

    def int_(n):
        return b"J" + n.to_bytes(4, "little", signed=True)  # BININT

    def tuple_(items):
        return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE

    storage_id = tuple_([text("storage"), b"ctorch\nFloatStorage\n" + build, text("0"), text("cpu"),
                         int_(numel)])
    args = tuple_([storage_id + b"Q", int_(offset), tuple_(map(int_, size)), tuple_(map(int_, stride)),
                   b"\x89", b"ccollections\nOrderedDict\n)R"])  # BINPERSID, NEWFALSE, REDUCE
    data = b"\x80\x02}" + text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"Rs."
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/data/0", np.arange(numel, dtype=np.float32).tobytes())
    return path


def test_reader_checks_tensors_against_their_storage(tmp_path):
    path = tmp_path / "crafted.pt"
    got = read_torch_state_dict(_crafted_state_dict(path, size=(2, 2), stride=(1, 2)))
    np.testing.assert_array_equal(got["w"], [[0, 2], [1, 3]])  # the crafting itself is right
    for size, stride, offset in [((10,), (1,), 0), ((2, 2), (1, 3), 0), ((4,), (1,), 1)]:
        with pytest.raises(pickle.UnpicklingError, match="reaches outside its storage"):
            read_torch_state_dict(_crafted_state_dict(path, size, stride, offset))
    # A BUILD that would retarget the shared FloatStorage stand-in fails on its immutability.
    build = b"}" + b"X\x05\x00\x00\x00dtype" + b"ccollections\nOrderedDict\n" + b"sb"
    with pytest.raises(pickle.UnpicklingError, match="malformed pickle"):
        read_torch_state_dict(_crafted_state_dict(path, size=(4,), stride=(1,), build=build))
    assert read_torch_state_dict(_crafted_state_dict(path, size=(4,), stride=(1,)))["w"].dtype == np.float32


def test_reader_rejects_other_files(tmp_path):
    (tmp_path / "text.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(pickle.UnpicklingError, match="not a torch.save file"):
        read_torch_state_dict(tmp_path / "text.pth")
    (tmp_path / "list.pth").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(pickle.UnpicklingError, match="not a torch.save file"):
        read_torch_state_dict(tmp_path / "list.pth")


# --------------------------------------------------------------------------------------------
# The loader: cache, hash prefixes, download (on a small crafted file: no torch needed)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def small_weights(tmp_path):
    """A small state dict file in torch's zip format (not the network's: the loader reads any)."""
    return _crafted_state_dict(tmp_path / "small_weights.pth", size=(2, 2), stride=(2, 1))


def test_loader_converts_once_then_reads_the_npz(small_weights, tmp_path, monkeypatch):
    path = small_weights
    first = load_fid_inception_weights(path, cache_dir=tmp_path / "cache")
    (cached,) = os.listdir(tmp_path / "cache")
    assert cached == f"fid_inception-{inception_weights._sha256(str(path))}.npz"

    def no_reads(path):
        raise AssertionError("the weights file was read again instead of the .npz cache")
    monkeypatch.setattr(inception_weights, "read_torch_state_dict", no_reads)
    second = load_fid_inception_weights(path, cache_dir=tmp_path / "cache")
    assert list(second) == list(first) == ["w"]
    np.testing.assert_array_equal(second["w"], [[0, 1], [2, 3]])
    assert second["w"].dtype == np.float32


def test_loader_default_cache_dir_is_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("VDM_JAX_CACHE", str(tmp_path))
    assert inception_weights.default_cache_dir() == str(tmp_path)
    monkeypatch.delenv("VDM_JAX_CACHE")
    assert inception_weights.default_cache_dir().endswith(os.path.join(".cache", "vdm_jax"))


def test_loader_offline_without_the_file_says_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = str(tmp_path / FID_WEIGHTS_FILE)
    for kwargs in ({}, {"download": False}):
        with pytest.raises(FileNotFoundError) as info:
            load_fid_inception_weights(cache_dir=tmp_path, **kwargs)
        message = str(info.value)
        assert FID_WEIGHTS_URL in message and target in message and "--inception_weights=PATH" in message
    assert os.listdir(tmp_path) == []  # no partial download left behind


class _Response:
    """What urlopen returns: a readable context manager over `data`."""

    def __init__(self, data):
        self.data, self.at = data, 0

    def read(self, n):
        self.at, block = self.at + n, self.data[self.at:self.at + n]
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_loader_downloads_and_checks_the_hash_prefix(small_weights, tmp_path, monkeypatch):
    path, cache = small_weights, tmp_path / "cache"
    data = path.read_bytes()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(data))
    with pytest.raises(ValueError, match="does not start with 6726825d"):  # not the published file
        load_fid_inception_weights(cache_dir=cache)
    assert os.listdir(cache) == []  # the bad download is deleted
    # With the prefix of these bytes, the download is accepted, kept and converted.
    prefix = inception_weights._sha256(str(path))[:8]
    monkeypatch.setattr(inception_weights, "FID_WEIGHTS_HASH_PREFIX", prefix)
    weights = load_fid_inception_weights(cache_dir=cache)
    assert (cache / FID_WEIGHTS_FILE).read_bytes() == data
    np.testing.assert_array_equal(weights["w"], read_torch_state_dict(path)["w"])
    assert len(os.listdir(cache)) == 2  # the download and its .npz


def test_loader_rejects_a_file_whose_name_has_another_hash(small_weights, tmp_path):
    named = tmp_path / FID_WEIGHTS_FILE  # named like the published file, other contents
    shutil.copy(small_weights, named)
    with pytest.raises(ValueError, match="sha256 .* does not start with 6726825d"):
        load_fid_inception_weights(named, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_fid_inception_weights(tmp_path / "absent.pth", cache_dir=tmp_path / "cache")


# --------------------------------------------------------------------------------------------
# Building from a state dict; input checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict(fid_weights):
    return read_torch_state_dict(fid_weights[0])


def test_from_weights_maps_names_and_layouts(state_dict):
    without_counters = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    model = fid_inception_from_weights(without_counters)  # BatchNorm's counters are optional
    kernel = state_dict["Mixed_6b.branch7x7_2.conv.weight"]  # OIHW (128, 128, 1, 7)
    np.testing.assert_array_equal(model.Mixed_6b.branch7x7_2.conv.kernel[...], kernel.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.Mixed_7c.branch_pool.bn.var[...],
                                  state_dict["Mixed_7c.branch_pool.bn.running_var"])
    np.testing.assert_array_equal(model.fc.kernel[...], state_dict["fc.weight"].T)
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"


def test_from_weights_names_the_wrong_key(state_dict):
    missing = dict(state_dict)
    del missing["Mixed_5c.branch5x5_2.bn.running_mean"]
    with pytest.raises(ValueError, match=r"missing Mixed_5c\.branch5x5_2\.bn\.running_mean"):
        fid_inception_from_weights(missing)
    with pytest.raises(ValueError, match=r"unexpected AuxLogits\.fc\.weight"):
        fid_inception_from_weights({**state_dict, "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)})
    wrong = {**state_dict, "fc.bias": np.zeros(1000, np.float32)}
    with pytest.raises(ValueError, match=r"fc\.bias must have shape \(1008,\), got \(1000,\)"):
        fid_inception_from_weights(wrong)


@pytest.fixture(scope="module")
def abstract_model():
    return nnx.eval_shape(lambda: FIDInception(rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((32, 32, 3), np.float32), ValueError,
     r"FIDInception: images must be RGB images \[B, H, W, 3\].*\(32, 32, 3\)"),
    (np.zeros((2, 32, 32, 4), np.float32), ValueError, r"FIDInception: images must be RGB images.*\(2, 32, 32, 4\)"),
    (np.zeros((2, 3, 32, 32), np.float32), ValueError, r"images must be RGB images .*channels last"),
    (np.zeros((2, 32, 32, 3), np.uint8), TypeError, r"FIDInception: images must be a floating-point array"),
])
def test_network_input_checks(images, error, match, abstract_model):
    with pytest.raises(error, match=match):
        abstract_model(images)
    with pytest.raises(error, match=match):  # at trace time, too
        jax.jit(lambda x: abstract_model(x))(images)


def test_to_unit_interval():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 1, 3)
    out = to_unit_interval(images)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.2, 1.0], rtol=1e-7)
    with pytest.raises(ValueError, match=r"to_unit_interval: images must be RGB images \[B, H, W, 3\]"):
        to_unit_interval(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"to_unit_interval: images must be RGB images"):
        to_unit_interval(np.zeros((1, 4, 4, 1), np.uint8))
    with pytest.raises(TypeError, match=r"to_unit_interval: images must be an integer array"):
        to_unit_interval(np.zeros((1, 4, 4, 3), np.float32))
