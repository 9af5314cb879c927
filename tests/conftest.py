"""Test setup: JAX's compilation cache and strict rank promotion (the environment — 8 fake CPU
devices, XLA flags — is set before JAX is imported, by the repository's top-level conftest.py),
and the fixtures the core's tests share: `dtype`, `x64`, `raises` (the error tables),
`no_host_reads` (the transfer guard), `optimal_pred` (Gaussian data's exact denoiser),
`pytorch_fid`/`fid_weights` (the FID network's PyTorch reference and a random weights file), and
`once_per_run` (what the whole run computes once, with `-n` as well).
"""
import contextlib
import importlib.util
import os
import time

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import vdm_jax

# By path, not `import tests.torch_peers`: torch-fidelity installs a package named `tests` of its own.
_spec = importlib.util.spec_from_file_location("torch_peers", os.path.join(os.path.dirname(__file__), "torch_peers.py"))
torch_peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_peers)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Catches the `t[:, None, None, None]` slips that silently broadcast a loss wrongly.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
    """Runs a test in float32 and in float64 (with x64 enabled just for that test)."""
    if request.param == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


@pytest.fixture
def x64():
    """Enables 64-bit types for one test."""
    with jax.enable_x64(True):
        yield


def _raises(fn, args, kwargs, error, match):
    """`fn(*args, **kwargs)` raises `error` matching `match`, eagerly and under `jax.jit` with its
    jax.Array positional arguments traced (the other arguments are closed over, so host values
    stay host values)."""
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)
    traced = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

    def with_tracers(*arrays):
        full = list(args)
        for i, a in zip(traced, arrays):
            full[i] = a
        return fn(*full, **kwargs)

    with pytest.raises(error, match=match):
        jax.jit(with_tracers)(*(args[i] for i in traced))


GAUSSIAN_M, GAUSSIAN_S = 0.5, 0.3  # the data of the `optimal_pred` fixture: x ~ N(M, S² I)


def _optimal_pred(gamma_fn, kind="eps"):
    """The Bayes-optimal `pred_fn(z_t, t)` of the given kind for x ~ N(GAUSSIAN_M, GAUSSIAN_S² I)."""
    def pred(z, t):
        gamma = gamma_fn(t)
        alpha, sigma = (v[:, None] for v in vdm_jax.alpha_sigma(gamma))
        eps = sigma * (z - alpha * GAUSSIAN_M) / (alpha ** 2 * GAUSSIAN_S ** 2 + sigma ** 2)
        if kind == "eps":
            return eps
        if kind == "x":
            return vdm_jax.x_from_eps(z, eps, gamma)
        if kind == "score":
            return vdm_jax.score_from_eps(eps, gamma)
        return vdm_jax.v_from_eps(z, eps, gamma)
    return pred


@pytest.fixture(scope="session")
def optimal_pred():
    """`optimal_pred(gamma_fn, kind='eps')`: the exact denoiser of Gaussian data x ~ N(0.5, 0.3² I)
    (the samplers' and likelihoods' exact cases; `v[:, None]`: data of shape [B, D])."""
    return _optimal_pred


@pytest.fixture
def raises():
    """The check of one row of an error table: (fn, args, kwargs, error, match)."""
    return _raises


@contextlib.contextmanager
def _no_host_reads():
    with pytest.MonkeyPatch.context() as patch:
        for name in ("asarray", "array", "asanyarray"):
            patch.setattr(np, name, _refusing_jax_arrays(getattr(np, name), f"np.{name}"))
        array_type = type(jnp.zeros(()))
        for name in ("__array__", "tolist", "item", "__float__", "__int__", "__bool__", "__index__"):
            patch.setattr(array_type, name, _refusing_jax_arrays(None, name))
        with jax.transfer_guard_device_to_host("disallow"):
            yield


def _refusing_jax_arrays(original, what):
    def wrapper(a=None, *args, **kwargs):
        if original is None or any(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(a)):
            raise AssertionError(f"{what} of a jax.Array: a device-to-host read")
        return original(a, *args, **kwargs)
    return wrapper


@pytest.fixture
def no_host_reads():
    """A context manager in which any read of a jax.Array's values on the host raises AssertionError.

    (a) `jax.transfer_guard_device_to_host("disallow")`, which fires on GPU/TPU; (b) because on CPU
    that guard never fires, NumPy's `asarray`/`array`/`asanyarray` of a jax.Array (or of a list
    holding one), and the array type's `__array__`, `tolist`, `item`, `__float__`, `__int__`,
    `__bool__`, `__index__` raise. Everything is restored when the block ends.
    """
    return _no_host_reads

@pytest.fixture(scope="session")
def pytorch_fid():
    """The `pytorch_fid.inception` module (skips without it; tests/torch_peers.py)."""
    return torch_peers.import_peer("pytorch_fid.inception")


@pytest.fixture(scope="session")
def import_peer():
    """`import_peer(module)`: a PyTorch peer's module, or the test skips (tests/torch_peers.py)."""
    return torch_peers.import_peer


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    """(path, torch_model): random weights saved as pytorch-fid's weights file (torch's default
    zip format), and pytorch-fid's InceptionV3([3]) built from that file, in eval mode."""
    pytorch_fid = torch_peers.import_peer("pytorch_fid.inception")
    import torch
    path = tmp_path_factory.mktemp("fid_weights") / "random_fid_inception.pth"
    torch.save(torch_peers.random_fid_state_dict(), path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid, "load_state_dict_from_url",
                      lambda *args, **kwargs: torch.load(path, weights_only=True))
        model = pytorch_fid.InceptionV3([3], resize_input=True, normalize_input=True,
                                        use_fid_inception=True).eval()
    return path, model


@pytest.fixture(scope="session")
def once_per_run(tmp_path_factory):
    """`once_per_run(name, make)`: a directory that `make(directory)` filled once for the whole
    test run, with `-n` as well: the first worker to ask for `name` makes it in a directory the
    workers share (their base temporary directories' parent), the others wait for it (xdist's
    recipe for expensive session fixtures). Returns the directory."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent

    def run(name, make):
        directory, done, failed = root / name, root / f"{name}.done", root / f"{name}.failed"
        try:
            os.close(os.open(root / f"{name}.lock", os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # another worker makes it
            deadline = time.monotonic() + 1800
            while not done.exists():
                if failed.exists() or time.monotonic() > deadline:
                    raise RuntimeError(f"once_per_run: {name!r} was not made by the worker making it (see its error)")
                time.sleep(0.1)
            return directory
        try:
            directory.mkdir()
            make(directory)
        except BaseException:
            failed.touch()
            raise
        done.touch()
        return directory

    return run
