"""Bad command lines of the experiment entry points end with one line `error: ...`, no traceback.

The entry points define their flags on absl's global FLAGS, so each module's flags are parsed in a
subprocess of its own (importing it costs no JAX: the entry points import JAX after parsing).
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest

from experiments import common
from vdm_jax.training.config import SAMPLERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Parses each command line with the module's flags and the entry points' parser; prints what each exits with.
_PARSE = """
import json, sys
from absl import flags
from experiments import {module} as module
from experiments.common import parse_flags
out = []
for argv in {argvs!r}:
    flags.FLAGS.unparse_flags()
    try:
        parse_flags(["prog", *argv], config_keys="config" in flags.FLAGS)  # (as the training entry points do)
        out.append(None)
    except SystemExit as e:
        out.append(str(e.code))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          capture_output=True, text=True, timeout=300)


def _exits(module: str, argvs: list[list[str]], extra: str = "") -> list:
    """What `module.parse_flags` exits with for each argv (None: parsed), then what `extra` appends."""
    code = _PARSE.format(module=module, argvs=argvs) + textwrap.dedent(extra) + "\nprint(json.dumps(out))"
    run = _python("-c", code)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


EVALUATE = {
    "--draws=0": "error: flag --draws=0: 0 is not a positive integer",
    "--sample_batch_size=0": "error: flag --sample_batch_size=0: 0 is not a positive integer",
    "--batch_size=-8": "error: flag --batch_size=-8: -8 is not a positive integer",
    "--num_samples=-1": "error: flag --num_samples=-1: -1 is not a non-negative integer",
    "--sample_steps=-1": "error: flag --sample_steps=-1: -1 is not a non-negative integer",
    "--step=-5": "error: flag --step=-5: -5 is not a non-negative integer",
    "--draws=two": "error: flag --draws=two: invalid literal for int() with base 10: 'two'",
    "--sampler=rk45": f"error: flag --sampler=rk45: value should be one of <{'|'.join(SAMPLERS)}>",  # the schema's
    "--guidance=x": "error: flag --guidance=x: could not convert string to float: 'x'",
    "--nosuch=1": "error: Unknown command line flag 'nosuch'",
    "extra": "error: unexpected arguments (not --flags): extra",
}

# evaluate's choice of sampler and steps: the flags', else the run's (its steps only with its
# sampler); steps that the run's sampler can't take are named by flag.
_SAMPLING = """
from types import SimpleNamespace as NS
from vdm_jax.training import default_config, make_objective, validate_config
config = NS(training=NS(sampler="ddim", sample_steps=100))
ddpm = make_objective(default_config(), validate_config(default_config()))  # T = 1000
sampled = []
for sampler, steps in [(None, None), ("ancestral", None), ("ddim", 20), ("ancestral", 50), ("ddim", 5000)]:
    try:
        sampled.append(list(module._sampling(NS(sampler=sampler, sample_steps=steps, num_samples=8), config, ddpm)))
    except ValueError as e:
        sampled.append(str(e))
out.append(sampled)
out.append(flags.FLAGS["sample_steps"].help)
"""


def test_evaluate_flags():
    argvs = [["--workdir=w", *argv.split()] for argv in EVALUATE] + [[], ["--workdir=w", "--draws=3"]]
    *exits, sampling, steps_help = _exits("evaluate", argvs, extra=_SAMPLING)
    assert exits == [*EVALUATE.values(), "error: flag --workdir=None: Flag --workdir must have a value other "
                     "than None.", None]
    assert sampling[:3] == [["ddim", 100], ["ancestral", 1000], ["ddim", 20]]  # (the steps each will take)
    from vdm_jax import SAMPLERS
    assert ", ".join(f"{n} {s.default_steps}" for n, s in SAMPLERS.items() if s.default_steps) in steps_help
    assert sampling[3].startswith("--sample_steps=50: DDPM's ancestral sampler runs all T = 1000 steps")
    assert sampling[4] == "--sample_steps=5000: ddim on a DDPM with T = 1000 takes at most T steps."


# evaluate's class-conditional flags (--labels, --guidance, --guidance_interval): what each command
# line is checked into before any work (`_class_flags`), then against a run of K classes (`_classes`;
# K = 0: unconditional). Each error is one line.
CLASS_FLAGS = [
    ("--labels=all --num_samples=4", 10, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ("--labels=3,1,3 --num_samples=4 --guidance=2 --guidance_interval=-2,5", 10, [3, 1, 3]),
    ("--labels=0 --num_samples=1 --guidance=-1", 2, [0]),
    ("--num_samples=4", 0, None),
    ("--num_samples=4", 10, None),  # (a conditional run sampled unconditionally: the 'no label' class)
    ("--labels=0,1", 10, "--labels chooses the classes of the samples, and none are asked for: give "
                         "--num_samples=N (per class) too."),
    ("--labels=a,b --num_samples=4", 10, "--labels=a,b: give comma-separated classes (e.g. 0,1,2) or 'all' "
                                         "(every class of the run)."),
    ("--labels=0,,1 --num_samples=4", 10, "--labels=0,,1: give comma-separated classes (e.g. 0,1,2) or 'all' "
                                          "(every class of the run)."),
    ("--labels=0,10 --num_samples=4", 10, "--labels=0,10: class 10 is not one of the run's 0..9 "
                                          "(model.num_classes = 10)."),
    ("--labels=-1 --num_samples=4", 10, "--labels=-1: class -1 is not one of the run's 0..9 (model.num_classes = 10)."),
    ("--labels=all --num_samples=4", 0, "--labels needs a class-conditional run, and w's model.num_classes is 0 "
                                        "(train one with --config.model.num_classes=K)."),
    ("--guidance=2 --num_samples=4", 10, "--guidance=2 guides samples toward their classes: give --labels too "
                                         "(e.g. --labels=all)."),
    ("--guidance=nan --labels=0 --num_samples=4", 10, "--guidance must be a finite number, got nan."),
    ("--labels=0 --num_samples=4 --guidance=1 --guidance_interval=5,1", 10,
     "--guidance_interval=5,1: lo must be below hi (γ in (lo, hi])."),
    ("--labels=0 --num_samples=4 --guidance=1 --guidance_interval=3", 10,
     "--guidance_interval=3: give lo,hi, two values of γ = -log SNR (e.g. -2,5)."),
    ("--labels=0 --num_samples=4 --guidance_interval=-2,5", 10,
     "--guidance_interval limits where the guidance applies: give --guidance=w too."),
]

_CLASSES = """
from types import SimpleNamespace as NS
checked = []
for argv, k in {cases!r}:
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", "--workdir=w", *argv.split()])
    try:
        labels, interval = module._class_flags(flags.FLAGS)
        checked.append(module._classes(flags.FLAGS, labels, NS(model=NS(num_classes=k))))
    except ValueError as e:
        checked.append(str(e))
out.append(checked)
"""


def test_evaluate_class_flags():
    *_, checked = _exits("evaluate", [], extra=_CLASSES.format(cases=[(a, k) for a, k, _ in CLASS_FLAGS]))
    assert checked == [expected for _, _, expected in CLASS_FLAGS]


def test_quickstart_and_cifar10_flags():
    assert _exits("quickstart", [["--steps=0"], ["--steps=1e3"], ["--stpes=10"], ["10"], ["--steps=5"]]) == [
        "error: flag --steps=0: 0 is not a positive integer",
        "error: flag --steps=1e3: invalid literal for int() with base 10: '1e3'",
        "error: Unknown command line flag 'stpes'. Did you mean: steps ?",
        "error: unexpected arguments (not --flags): 10",
        None,
    ]
    assert _exits("cifar10", [["--workdir=w", "extra"], ["--workdir=w", "--nosuch"],
                              ["--workdir=w", "--config=experiments/configs/cifar10.py:big"]]) == [
        "error: unexpected arguments (not --flags): extra",
        "error: Unknown command line flag 'nosuch'",
        "error: flag --config=experiments/configs/cifar10.py:big: Error whilst parsing config file: ValueError: "
        "unknown CIFAR-10 config variant 'big'; choose one of ('ddpm', 'vdm', 'vdm_nnet', 'small').",
    ]


def test_quickstart_takes_config_overrides_and_help_lists_the_chosen_configs_values():
    """The quickstart is experiments.cifar10 with its own config: its overrides reach the config; --help
    after --config=FILE:VARIANT lists that variant's values, not the schema's defaults."""
    def config(*argv):  # (ml_collections defines the override flags from sys.argv as the module is imported)
        return _python("-c", f"import sys; sys.argv = ['prog', *{list(argv)!r}]; from experiments import quickstart, "
                       "common; common.parse_config_flags(sys.argv); c = common.config_from_flags(); "
                       "print(c.training.batch_size, c.data.source)")

    run = config("--steps=7", "--config.training.batch_size=32")
    assert run.returncode == 0 and run.stdout.split() == ["32", "digits"], run.stderr[-2000:]
    run = config("--config.training.bach_size=32")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'training.bach_size'"), run.stderr
    vdm = _python("-m", "experiments.cifar10", "--config=experiments/configs/cifar10.py:vdm", "--help")
    assert vdm.returncode == 0 and "config keys (experiments/configs/cifar10.py:vdm's values" in vdm.stdout
    assert "--config.diffusion.family='vdm'" in vdm.stdout


def test_fid_and_fid_stats_flags():
    assert _exits("fid", [["--images=a.npz"], ["--images=a.npz", "--reference=b.npz", "--batch_size=0"],
                          ["--images=a.npz", "--reference=b.npz"]]) == [
        "error: flag --reference=None: Flag --reference must have a value other than None.",
        "error: flag --batch_size=0: 0 is not a positive integer",
        None,
    ]
    assert _exits("fid_stats", [["--source=digits"], ["--source=digits", "--out=s.npz", "--num=-1"],
                                ["--source=digits", "--out=s.npz"]]) == [
        "error: flag --out=None: Flag --out must have a value other than None.",
        "error: flag --num=-1: -1 is not a non-negative integer",
        None,
    ]


@pytest.mark.parametrize("argv, message", [
    (["-m", "experiments.quickstart", "--steps=0"], "error: flag --steps=0: 0 is not a positive integer"),
    (["-m", "experiments.fid", "--images=nowhere.npz", "--reference=b.npz"], "error: --images=nowhere.npz does not exist."),
    (["-m", "experiments.evaluate", "--workdir=nowhere", "--fid"],
     "error: --fid needs samples and a reference: give --num_samples=N and --reference=stats.npz "
     "(experiments.fid_stats writes one)."),
    (["-m", "experiments.evaluate", "--workdir=nowhere", "--sampler=dpm_solver", "--sample_steps=20"],
     "error: --sampler and --sample_steps choose how samples are drawn, and none are asked for: give "
     "--num_samples=N too."),
    (["-m", "experiments.evaluate", "--workdir=nowhere", "--guidance=3"],
     "error: --guidance=3 guides samples toward their classes: give --labels too (e.g. --labels=all)."),
    (["-m", "experiments.quickstart", "--conditional", "--config=experiments/configs/quickstart.py"],
     "error: --conditional is --config=experiments/configs/quickstart.py:conditional: give one of them."),
    (["-m", "experiments.evaluate", "--workdir=nowhere", "--out=README.md"],
     "error: --out=README.md is a file; --out names the directory the outputs go to."),
    (["-m", "experiments.evaluate", "--workdir=nowhere", "--num_samples=5", "--sample_batch_size=7"],
     "error: --sample_batch_size=7 must be divisible by the number of devices (8) so that every device gets "
     "the same share."),
])
def test_entry_points_exit_with_one_line(argv, message):
    run = _python(*argv)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == message


def test_unreadable_npz_inputs_are_one_line_naming_the_file(tmp_path):
    """experiments.fid's and evaluate's --images/--reference: a corrupt or pickled .npz is named, never
    with NumPy's suggestion to load it unsafely."""
    import numpy as np

    np.save(tmp_path / "objects.npy", np.array([None, 1]))  # a pickled .npy, not an .npz
    (tmp_path / "junk.npz").write_bytes(b"junk" * 100)
    np.savez(tmp_path / "objects.npz", images=np.array([None, 1]))
    for name, why in (("objects.npy", "it holds pickled Python objects, which are never loaded"),
                      ("junk.npz", ""), ("objects.npz", "it holds pickled Python objects, which are never loaded")):
        with pytest.raises(ValueError) as e:
            common.read_images_or_statistics(str(tmp_path / name), "--images")
        message = str(e.value)
        assert message.startswith(f"--images={tmp_path / name} is not a readable .npz ({why}") and "\n" not in message
        assert message.endswith("expected uint8 'images' or statistics 'mu' and 'sigma'.")
        assert "allow_pickle" not in message


def test_run_or_explain_exits_with_one_line(monkeypatch):
    def fail(error):
        raise error

    monkeypatch.delenv("VDM_JAX_TRACEBACK", raising=False)
    for error, message in [(ValueError("bad value"), "error: bad value"),
                           (FileNotFoundError("no config file\n  looked in: x.py"),
                            "error: no config file looked in: x.py"),
                           (pickle.UnpicklingError("read_torch_state_dict: w.pth: refusing the global posix.system"),
                            "error: read_torch_state_dict: w.pth: refusing the global posix.system")]:
        with pytest.raises(SystemExit) as exit_info:
            common.run_or_explain(fail, error)
        assert exit_info.value.code == message
    monkeypatch.setenv("VDM_JAX_TRACEBACK", "1")
    with pytest.raises(OSError, match="disk full"):
        common.run_or_explain(fail, OSError("disk full"))


def test_quickstart_config_is_a_config_file():
    """experiments/configs/quickstart.py: the quickstart's run, importable without its flags and
    usable as `--config=experiments/configs/quickstart.py:STEPS` (the argument comes as a string)."""
    from experiments.configs.quickstart import get_config
    from vdm_jax.training import validate_config

    config = get_config("3")
    model = validate_config(config)
    assert config.training.num_steps == 3 and config.data.source == "digits"
    assert (model.image_size, model.in_channels) == (8, 1)
    assert get_config().training.num_steps == 2500


def test_the_conditional_quickstart():
    """`--config=experiments/configs/quickstart.py:conditional` (= quickstart --conditional): the
    quickstart's model conditioned on the digits' 10 labels, its grids 10 of each class; the
    --conditional flag picks it and its own default work directory."""
    from experiments.configs.quickstart import get_config
    from vdm_jax.training import validate_config

    config, plain = get_config("conditional"), get_config()
    assert validate_config(config).num_classes == 10 and validate_config(plain).num_classes == 0
    assert (config.training.label_dropout, config.training.num_samples, config.data.source) == (0.1, 100, "digits")
    assert config.training.num_steps == plain.training.num_steps
    run = _python("-c", "import sys; sys.argv = ['prog', '--conditional', '--steps=7']; from experiments import "
                  "quickstart, common; common.parse_config_flags(sys.argv); c = common.config_from_flags(); "
                  "from absl import flags; print(c.model.num_classes, c.training.label_dropout, flags.FLAGS.workdir)")
    assert run.returncode == 0 and run.stdout.split() == ["10", "0.1", os.path.join("runs", "quickstart_conditional")], \
        run.stderr[-2000:]
