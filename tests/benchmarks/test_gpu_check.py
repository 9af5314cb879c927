"""benchmarks/gpu_check.sh --dry: the GPU check's whole program, at small shapes on the CPU."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[2]
SECTIONS = ("matmul", "ddpm_bfloat16", "ddpm_float32", "vdm", "sample_ancestral_1000", "sample_dpm_solver_20",
            "bpd", "bpd_at_scale")


def _check(out, *args):
    """Runs `bash benchmarks/gpu_check.sh --dry ARGS --out=OUT` (this Python first on PATH): (the JSON, stdout)."""
    # One CPU device, as on a one-GPU machine (the suite's 8 fake devices would partition every program 8 ways).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count"))
    env = {**os.environ, "XLA_FLAGS": xla_flags,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", str(_ROOT / "benchmarks" / "gpu_check.sh"), "--dry", *args, f"--out={out}"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow(55)
def test_the_dry_run_records_every_section(tmp_path):
    """One dry run (about 40 s cold), checked section by section."""
    record, stdout = _check(tmp_path / "check.json")
    assert record["dry"] is True
    assert list(record["sections"]) == list(SECTIONS)
    for name in SECTIONS:
        assert "skipped" not in record["sections"][name], name
        assert f"{name}: " in stdout  # one progress line a section
    assert record["device"] == "1 × cpu (cpu)"
    assert record["machine"]["cores"] >= 1

    # Train sections: speed, FLOPs, both efficiencies, memory.
    peaks = record["sections"]["matmul"]
    assert peaks["bfloat16_flops_per_s"] > 0 and peaks["float32_flops_per_s"] > 0
    for name, dtype in (("ddpm_bfloat16", "bfloat16"), ("ddpm_float32", "float32"), ("vdm", "float32")):
        s = record["sections"][name]
        assert s["dtype"] == dtype  # ('auto' is float32 on a CPU)
        assert s["batch"] == record["plan"]["batch"] == 16
        assert s["images_per_s"] == pytest.approx(16 / s["step_s"])
        assert len(s["repeats_s"]) == record["plan"]["repeats"]
        assert s["flops_per_image"] > 0
        assert s["share_of_measured_matmul"] == pytest.approx(
            s["flops_per_s_per_device"] / peaks[f"{dtype}_flops_per_s"])
        assert s["mfu"] is None  # no spec peak for a CPU
        assert s["memory"]["temp_bytes"] > 0 and s["memory"]["total_bytes"] >= s["memory"]["argument_bytes"]
        assert s["copies"]["whole_argument"] == 0  # the donated state is updated in place
        if name.startswith("ddpm"):  # the step without the update, alternated with the step
            assert len(s["no_update_repeats_s"]) == len(s["repeats_s"]) and 0 < s["no_update_s"]
            assert -1 < s["update_share"] < 1
    # The VDM net (no downsampling, Fourier features) is another program than the DDPM net.
    assert record["sections"]["vdm"]["params"] != record["sections"]["ddpm_float32"]["params"]

    # Sampling and bits/dim.
    chain = record["sections"]["sample_ancestral_1000"]
    fast = record["sections"]["sample_dpm_solver_20"]
    assert (chain["sampler"], fast["sampler"], fast["steps"]) == ("ancestral", "dpm_solver", 20)
    for s in (chain, fast):
        assert s["images"] == 16 and s["images_per_s"] == pytest.approx(16 / s["chain_s"])
    assert record["sections"]["bpd"]["images_per_s"] > 0
    scale = record["sections"]["bpd_at_scale"]
    assert scale["examples_evaluated"] == scale["images"] == record["plan"]["scale_images"]


def test_a_tiny_budget_skips_the_later_sections(tmp_path):
    """Past --budget_s a section is recorded as skipped (the check stays within its time on a slow device)."""
    record, stdout = _check(tmp_path / "check.json", "--budget_s=0")
    assert list(record["sections"]) == ["matmul", "ddpm_bfloat16", "ddpm_float32", "vdm"]  # (no state to sample)
    assert all("over the 0 s budget" in s["skipped"] for s in record["sections"].values())
    assert "matmul: skipped" in stdout
