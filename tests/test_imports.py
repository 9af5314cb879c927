"""Importing vdm_jax touches no global state: no environment variables, no absl flags, no compiles;
and a run's start-up skips the slow imports it does not need (PyTorch, scikit-learn).

Checked in a fresh interpreter (this one has run the test suite's conftest and other tests).
"""
import json
import os
import subprocess
import sys

import pytest

PACKAGES = ("vdm_jax", "vdm_jax.models", "vdm_jax.training", "vdm_jax.data")

_PROBE = r"""
import importlib, json, os, sys

import jax
import jax.monitoring

compiles = []  # JAX's compile events: tracing, lowering, XLA compilation, compilation cache


def record(event, *args, **kwargs):
    if "compil" in event:
        compiles.append(event)


jax.monitoring.register_event_listener(record)
jax.monitoring.register_event_duration_secs_listener(record)
jax.monitoring.register_event_time_span_listener(record)

import absl.flags

environ = dict(os.environ)  # after `import jax`, which sets a few variables of its own
parsed = absl.flags.FLAGS.is_parsed()
for name in sys.argv[1:]:
    importlib.import_module(name)
result = {
    "environ_changes": {k: [environ.get(k), os.environ.get(k)] for k in {*environ, *os.environ}
                        if environ.get(k) != os.environ.get(k)},
    "parsed_before": parsed, "parsed_after": absl.flags.FLAGS.is_parsed(),
    "flags_present": [f for f in absl.flags.FLAGS if absl.flags.FLAGS[f].present],
    "compiles_during_imports": list(compiles),
}
# XLA_FLAGS set now still take effect, so the imports started no backend (set_cpu_xla_flags works).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
result["devices"] = jax.device_count()
jax.jit(lambda x: x + 1)(1.0)  # the detector's own check: this is seen
result["compiles_after_a_jit"] = compiles[len(result["compiles_during_imports"]):]

# What a training run starts with: its data (the digits) and its TensorBoard writer.
import tempfile
from vdm_jax.data import load_digits
from vdm_jax.training.metrics import MetricWriter
load_digits("test")
with tempfile.TemporaryDirectory() as logdir:
    writer = MetricWriter(logdir)
    writer.scalars(1, {"loss": 0.5})
    writer.close()
result["start_up_imports"] = {name: name in sys.modules for name in ("tensorboardX", "torch", "sklearn")}
import torch  # hidden from tensorboardX only while it was imported
result["torch_importable_after"] = torch.ones(2).sum().item() == 2.0
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def probe():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _PROBE, *PACKAGES], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_imports_touch_no_global_state(probe):
    assert probe["environ_changes"] == {}
    assert probe["parsed_before"] is False and probe["parsed_after"] is False
    assert probe["flags_present"] == []
    assert probe["compiles_during_imports"] == []
    assert probe["devices"] == 3
    assert "/jax/core/compile/backend_compile_duration" in probe["compiles_after_a_jit"]


def test_start_up_skips_torch_and_sklearn(probe):
    """tensorboardX would import PyTorch (1.5-2 s) and the digits scikit-learn (1 s): neither is
    imported by a run's start, and torch is importable as usual afterwards."""
    assert probe["start_up_imports"] == {"tensorboardX": True, "torch": False, "sklearn": False}
    assert probe["torch_importable_after"] is True
