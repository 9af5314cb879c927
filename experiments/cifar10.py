"""Train and evaluate a diffusion model on CIFAR-10.

    python -m experiments.cifar10 --workdir=DIR [--config=experiments/configs/cifar10.py:VARIANT] [--config.x=y]

A thin entry point: it reads the flags and calls `vdm_jax.training.train_and_evaluate`.
Rerunning the same command in the same work directory resumes from its latest checkpoint.
"""

if __name__ == "__main__":  # first: a Ctrl-C or SIGTERM from here on is honoured cleanly
    from experiments.common import hold_signals

    hold_signals()

import os

from absl import flags, logging

from experiments.common import define_config_flags

define_config_flags(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "cifar10.py") + ":small")


def main(argv):
    del argv  # parse_flags has rejected anything but flags
    from experiments.common import config_from_flags, run_or_explain, start_jax, supervise
    from vdm_jax.training import train_and_evaluate  # after flag parsing, so --help is fast

    start_jax()
    logging.set_verbosity(logging.WARNING)
    config = config_from_flags()
    t = config.training
    if t.distributed:  # one process of several: supervised (train_and_evaluate starts JAX's distributed runtime)
        supervise(process_id=t.process_id, num_processes=t.num_processes, heartbeat_timeout=t.heartbeat_timeout,
                  checkpoints=os.path.join(os.path.abspath(flags.FLAGS.workdir), "checkpoints"))
    summary = run_or_explain(train_and_evaluate, config, flags.FLAGS.workdir)
    if "eval" in summary:
        e = summary["eval"]
        print(f"step {e['step']}: test bpd {e['eval/total_bpd']:.4f} ± {e['eval/total_bpd_se']:.4f} "
              f"over {int(e['eval/examples'])} images"
              + (f" (given no label: {e['eval/unconditional_total_bpd']:.4f})" if "eval/unconditional_total_bpd" in e
                 else "") + (f"; samples: {summary['samples']}" if "samples" in summary else ""))


if __name__ == "__main__":
    from experiments.common import parse_config_flags, run_app

    run_app(main, parse_config_flags)
