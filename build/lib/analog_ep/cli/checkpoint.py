"""Checkpoint commands: share weights as safetensors (`export-weights`, `import-weights`) and convert old files."""

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


SHARE_EPILOG = """\
Share a trained model as one .safetensors file (tensors + the spec and run config as text; no code):

  seqep export-weights runs/imdb-cpu imdb-cpu.safetensors          # best.pt of a run (--which last.pt)
  seqep import-weights imdb-cpu.safetensors --out runs/imdb-shared   # a run directory again
  seqep evaluate runs/imdb-shared --split test                      # ... which every command reads
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export-weights", help="write a run's model as a .safetensors file to share",
                              description="Write a run's (or checkpoint's) model weights as .safetensors.",
                              epilog=SHARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("source", help="a run directory or a .pt checkpoint")
    e.add_argument("out", help="the .safetensors file to write")
    e.add_argument("--which", default="best.pt", choices=["best.pt", "last.pt"], help="checkpoint of a run")
    e.set_defaults(handler=run_export)
    i = subparsers.add_parser("import-weights", help="turn a shared .safetensors file into a run directory",
                              description="Rebuild a run directory from a file written by export-weights.",
                              epilog=SHARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("weights", help="a .safetensors file written by `seqep export-weights`")
    i.add_argument("--out", required=True, help="the new run directory")
    i.set_defaults(handler=run_import)
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


def run_export(args: argparse.Namespace) -> int:
    from analog_ep.train.weights_io import export_run

    if not str(args.out).endswith(".safetensors"):
        raise ConfigError(f"{args.out}: name the output FILE.safetensors")
    print(f"wrote {export_run(args.source, args.out, args.which)}")
    return 0


def run_import(args: argparse.Namespace) -> int:
    from analog_ep.train.weights_io import import_run

    out = import_run(args.weights, args.out)
    note = "" if (out / "config.json").is_file() else " (no run config inside: `evaluate` needs one; convert works)"
    print(f"wrote {out}{note}")
    return 0
