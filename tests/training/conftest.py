"""Small configs shared by the training tests (defined in micro_config.py, which also serves as a
config file for the command-line tests)."""
import importlib.util
import json
import os
import subprocess

import pytest

_spec = importlib.util.spec_from_file_location("micro_config", os.path.join(os.path.dirname(__file__),
                                                                             "micro_config.py"))
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
micro_config = _module.micro_config
MICRO_CONFIG_FILE = _module.__file__
get_micro_run_config = _module.get_config


@pytest.fixture
def micro():
    return micro_config


@pytest.fixture(scope="session")
def micro_run():
    """A config that trains the micro model on the digits for a few steps (`micro_config.get_config`)."""
    return get_micro_run_config


@pytest.fixture
def small_disk(tmp_path):
    """`mount(size)`: a file system (tmpfs) of `size` (e.g. '1m') in tmp_path, returned; `mount.resize(size)`
    gives it another size. Mounting needs root: where it is not allowed, the test is skipped with the reason."""
    where = tmp_path / "disk"
    where.mkdir()

    def run(*options):
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                              capture_output=True, text=True)

    def mount(size):
        mounted = run(f"size={size}")
        if mounted.returncode:
            pytest.skip(f"can't mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
        return where

    mount.resize = lambda size: run("remount", f"size={size}").check_returncode()
    yield mount
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture(scope="session")
def uninterrupted(once_per_run, micro_run):
    """family -> (work directory, summary) of the micro run of that family, uninterrupted, run in
    a test process (8 devices) once for the whole test run."""
    def run(family="ddpm"):
        def make(directory):
            from vdm_jax.training import train_and_evaluate

            summary = train_and_evaluate(micro_run(family), str(directory / "run"))
            (directory / "summary.json").write_text(json.dumps(summary, default=float))

        directory = once_per_run(f"uninterrupted_{family}", make)
        return directory / "run", json.loads((directory / "summary.json").read_text())

    return run


@pytest.fixture(scope="session")
def reference(uninterrupted):
    return uninterrupted("ddpm")
