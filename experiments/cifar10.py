"""Train and evaluate a diffusion model on CIFAR-10.

    python -m experiments.cifar10 --workdir=DIR [--config=experiments/configs/cifar10.py:VARIANT] [--config.x=y]

A thin entry point: it reads the flags and calls `vdm_jax.training.train_and_evaluate`.
Rerunning the same command in the same work directory resumes from its latest checkpoint.
"""

if __name__ == "__main__":  # first: a Ctrl-C or SIGTERM from here on is honoured cleanly
    from experiments.common import hold_signals

    hold_signals()

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cifar10.py") + ":small"
def _unknown_key(e):
    """Exits with one line naming a mistyped --config.key override: its dotted key and the closest."""
    from vdm_jax.training.config import check_key

    for arg in sys.argv[1:]:
        if arg.startswith("--config."):
            try:
                check_key(arg[len("--config."):].split("=", 1)[0])
            except (ValueError, TypeError) as err:
                sys.exit(f"error: {err}")
    text = str(e.args[0] if e.args else e).replace("\\'", "").replace("'", "")  # (not an override: as it came)
    sys.exit(f"error: unknown config key {' '.join(text.split())}")


try:  # ml_collections reads --config.x overrides from sys.argv already here
    config_flags.DEFINE_config_file("config", _DEFAULT, "Config file and variant (ddpm | vdm | small).",
                                    lock_config=True)
except (AttributeError, KeyError) as e:
    _unknown_key(e)
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard logs and samples go.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv  # parse_flags has rejected anything but flags
    from experiments.common import run_or_explain, start_jax, supervise
    from vdm_jax.training import train_and_evaluate  # after flag parsing, so --help is fast

    start_jax()

    logging.set_verbosity(logging.WARNING)
    try:
        config = run_or_explain(lambda: flags.FLAGS.config)  # overrides are applied here
    except (AttributeError, KeyError) as e:
        _unknown_key(e)
    t = config.training
    if t.distributed:  # one process of several: supervised (train_and_evaluate starts JAX's distributed runtime)
        supervise(process_id=t.process_id, num_processes=t.num_processes, heartbeat_timeout=t.heartbeat_timeout,
                  checkpoints=os.path.join(os.path.abspath(flags.FLAGS.workdir), "checkpoints"))
    summary = run_or_explain(train_and_evaluate, config, flags.FLAGS.workdir)
    if "eval" in summary:
        print(f"step {summary['eval']['step']}: test bpd {summary['eval']['eval/total_bpd']:.4f} "
              f"over {int(summary['eval']['eval/examples'])} images"
              + (f"; samples: {summary['samples']}" if "samples" in summary else ""))


def parse_flags(argv):
    """absl's parser, with bad flags, stray arguments and mistyped --config.key overrides reported in
    one line."""
    from experiments import common

    try:
        return common.parse_flags(argv, config_keys=True)  # a bad flag value, or an error inside the config file
    except (AttributeError, KeyError) as e:
        _unknown_key(e)


if __name__ == "__main__":
    from experiments.common import run_app

    run_app(main, parse_flags)
