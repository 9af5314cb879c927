"""`vdm_jax._files.atomic_write`: a file is written whole or not at all."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from vdm_jax._files import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_whole_files_text_and_binary(tmp_path):
    path = tmp_path / "new" / "a.json"  # (the folder is made)
    with atomic_write(str(path)) as f:
        f.write('{"é": 1}')
    assert path.read_text(encoding="utf-8") == '{"é": 1}'
    with atomic_write(str(tmp_path / "a.npz"), "wb") as f:
        np.savez(f, x=np.arange(3))
    with np.load(tmp_path / "a.npz") as npz:
        np.testing.assert_array_equal(npz["x"], np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "new"]  # no temporary file left


def test_a_failure_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_write(str(path)) as f:
            f.write("new, half")
            raise RuntimeError("disk gone")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_kill_mid_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    code = ("import os, signal, sys\nfrom vdm_jax._files import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n"
            "    f.write('new, half'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_text() == "old"
    leftover = [p.name for p in tmp_path.iterdir() if p.name != "a.txt"]
    assert len(leftover) == 1 and leftover[0].startswith(".a.txt.") and leftover[0].endswith(".tmp")


def test_mode_is_checked():
    with pytest.raises(ValueError, match="atomic_write: mode must be 'w' or 'wb', got 'a'"):
        with atomic_write("x", "a"):
            pass
