"""`seqep checkpoint-convert`: rewrite a trusted checkpoint that holds pickled objects as plain data."""

from __future__ import annotations

import argparse

from analog_ep.errors import ConfigError

EPILOG = """\
seqep reads checkpoints with torch.load(weights_only=True): tensors and plain data only, so a file
someone shared cannot run code when it is opened. A checkpoint that holds other pickled objects is
refused. If you trust where such a file came from, convert it once:

  seqep checkpoint-convert --trust runs/old/checkpoints/best.pt            # in place
  seqep checkpoint-convert --trust old.pt --out converted.pt

Converting unpickles the file (which can run code): never use it on a file you do not trust.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint-convert", help="rewrite a trusted old checkpoint as plain data",
                              description="Rewrite a checkpoint as tensors + plain data (weights_only-loadable).",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .pt file written by seqep")
    p.add_argument("--out", help="where to write (default: replace the file)")
    p.add_argument("--trust", action="store_true", help="required: you trust this file's origin")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from analog_ep.train.checkpoint import convert_trusted_checkpoint

    if not args.trust:
        raise ConfigError("converting unpickles the file, which can run code: pass --trust if you trust its origin")
    out = convert_trusted_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out} (loads with weights_only=True)")
    return 0
