"""Train a small diffusion model offline in a few minutes on a CPU, then sample and evaluate it.

    python -m experiments.quickstart [--workdir=runs/quickstart] [--steps=N] [--config.x=y]
    python -m experiments.quickstart --conditional     # class-conditional, in runs/quickstart_conditional

`experiments.cifar10` with the quickstart's config (experiments/configs/quickstart.py) and a
default work directory: every `--config.key=value` override works here too (`--help` lists them
with the quickstart's values), e.g. `--config.training.batch_size=32`; `--steps=N` is short for
`--config.training.num_steps=N`.

Data: scikit-learn's 8×8 handwritten digits (1,797 images that ship inside scikit-learn, so
nothing is downloaded), scaled to 0..255, at their native 8×8×1: the U-Net has two resolution
levels (8×8, 4×4). 1,500 images train, the last 297 are the test set. (`digits16`, the same
upsampled ×2, looks smoother but costs several times more per step on a CPU.)

Model: the tiny U-Net (0.41M parameters), DDPM with T = 1000 linear β, L_simple on ε, Adam 1e-3,
EMA 0.995 (with warm-up). It writes a sample grid (DDIM, 100 steps) and prints the test set's bits/dim.
It runs in minutes on a laptop's CPU; the README gives its time on 2 cores and its bits/dim.

`--conditional` (= `--config=experiments/configs/quickstart.py:conditional`, default work directory
runs/quickstart_conditional): the model conditioned on the digit's class (model.num_classes = 10,
training.label_dropout = 0.1), with one class a row in its sample grids; guide its samples with
`python -m experiments.evaluate --workdir=runs/quickstart_conditional --labels=all --num_samples=10
--guidance=1`.
"""

if __name__ == "__main__":  # first: a Ctrl-C or SIGTERM from here on is honoured cleanly
    from experiments.common import hold_signals

    hold_signals()

import os
import sys

from absl import flags, logging

from experiments.common import define_config_flags

# --conditional picks the config's variant and the work directory's default, which the config flag
# takes as it is defined (ml_collections reads the command line's overrides there already).
_CONDITIONAL = any(a == "--conditional" or a.lower() in ("--conditional=true", "--conditional=1")
                   for a in sys.argv[1:])
define_config_flags(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "quickstart.py")
                    + (":conditional" if _CONDITIONAL else ""),
                    workdir=os.path.join("runs", "quickstart_conditional" if _CONDITIONAL else "quickstart"))
flags.DEFINE_integer("steps", None, "Training steps (short for --config.training.num_steps; default 2500).",
                     lower_bound=1)
flags.DEFINE_boolean("conditional", False, "Class-conditional on the digits' labels (the config's 'conditional' "
                     "variant; work directory runs/quickstart_conditional by default).")


def main(argv):
    del argv  # parse_flags has rejected anything but flags
    from experiments.common import config_from_flags, run_or_explain, start_jax

    start_jax()
    logging.set_verbosity(logging.WARNING)
    from vdm_jax.training import train_and_evaluate

    if flags.FLAGS.conditional and flags.FLAGS["config"].present:
        sys.exit("error: --conditional is --config=experiments/configs/quickstart.py:conditional: give one of them.")
    config = config_from_flags()
    if flags.FLAGS.steps is not None:
        config.training.num_steps = flags.FLAGS.steps
    summary = run_or_explain(train_and_evaluate, config, flags.FLAGS.workdir)
    if "eval" in summary:
        ev = summary["eval"]
        print(f"quickstart: {summary['step']} steps; test bits/dim {ev['eval/total_bpd']:.3f} ± "
              f"{ev['eval/total_bpd_se']:.3f} (standard error) over "
              f"{int(ev['eval/examples'])} test images; samples: {summary['samples']}")


if __name__ == "__main__":
    from experiments.common import parse_config_flags, run_app

    run_app(main, parse_config_flags)
