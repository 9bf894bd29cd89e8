"""The `seqep` command line: one argparse tree, subcommands registered by the modules that own them.

`analog_ep` registers its own commands; other installed packages (e.g. `spiking_ep`) add theirs through
the `seqep.commands` entry-point group, so `analog_ep` never imports the spiking backend.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from analog_ep.errors import SeqepError

ANALOG_COMMAND_MODULES = (
    "analog_ep.cli.data",
    "analog_ep.cli.gdu",
    "analog_ep.cli.train",
    "analog_ep.cli.bench",
    "analog_ep.cli.checkpoint",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seqep",
        description="Equilibrium Propagation for sequence classifiers (analog and spiking backends).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `seqep COMMAND --help` for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    import importlib

    for module_name in ANALOG_COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:  # a module still being written: skip it, do not break the CLI
            if err.name != module_name:
                raise
            continue
        module.register(subparsers)
    for entry in entry_points(group="seqep.commands"):
        entry.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except SeqepError as err:
        from analog_ep.train.distributed import prints_user_errors

        if prints_user_errors(err):  # under torchrun: once, not by every rank
            print(f"seqep {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nseqep {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
