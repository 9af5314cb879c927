"""vdm_jax's benchmarks: `python -m benchmarks SUBCOMMAND [flags]` (`--help` lists them; the figures
are in docs/benchmarks.md). Each sets vdm_jax's XLA:CPU flags first, as the entry points do, and
writes JSON with the machine, device and versions to benchmarks/results/ (or --out)."""
import argparse
import importlib

from benchmarks.common import COMMANDS

MODULES = ("suite", "gpu_check", "steps", "sampling", "evaluation", "loop", "analytic", "guidance_digits", "import_check")


def parser() -> argparse.ArgumentParser:
    for module in MODULES:
        importlib.import_module(f"benchmarks.{module}")
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = top.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (fn, flags) in COMMANDS.items():
        doc = fn.__doc__ or ""
        p = sub.add_parser(name, help=doc.splitlines()[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        for names, kwargs in flags:
            p.add_argument(*names, **kwargs)
    return top


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # (the training loop's and orbax's progress lines)
    if getattr(args, "xla_options", "vdm_jax") == "vdm_jax":
        from vdm_jax import set_cpu_xla_flags

        set_cpu_xla_flags(convolutions=getattr(args, "convolutions", None))  # before the first computation
    COMMANDS[args.command][0](args)


if __name__ == "__main__":
    main()
