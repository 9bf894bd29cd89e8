"""The spiking backend's commands: `seqep convert`, `spiking-eval`, `compare`, `export-nir`, `demo`, `spiking-train`.

One module per command (each with `register(subparsers)` and its handler), shared flags in `options`.
`analog_ep` finds us through entry points (pyproject.toml), so it never imports the spiking backend:
`seqep.commands` → `register`, `seqep.backends` → `evaluate_backend` (`seqep evaluate --backend spiking`),
`seqep.train_backends` → `train_backend` (`seqep train --backend spiking`).
"""

from __future__ import annotations

import argparse

from analog_ep.errors import ConfigError
from spiking_ep.commands import compare, convert, demo, export_nir, spiking_eval, spiking_train
from spiking_ep.commands.spiking_train import run_spiking_train

COMMANDS = (convert, spiking_eval, compare, export_nir, demo, spiking_train)  # the order of `seqep --help`
_register_training = spiking_train.register  # the spiking-train parser alone (tests build it)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add every spiking command to the `seqep` parser."""
    for command in COMMANDS:
        command.register(subparsers)


def evaluate_backend(args: argparse.Namespace) -> int:
    """`seqep evaluate RUN_DIR --backend spiking [--timesteps ...]`: the same as `seqep spiking-eval`."""
    argv = ["spiking-eval", args.run_dir, "--split", args.split, "--timesteps",
            args.timesteps or spiking_eval.DEFAULT_TIMESTEPS]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.json:
        argv.append("--json")
    parser = argparse.ArgumentParser(prog="seqep")
    spiking_eval.register(parser.add_subparsers())
    return spiking_eval.run_spiking_eval(parser.parse_args(argv))


def train_backend(args: argparse.Namespace) -> int:
    """`seqep train ... --backend spiking`: the same as `seqep spiking-train`, from the analog train flags.

    Reads `out`; `init` (an analog run to fine-tune; absent: from scratch with `task`/`preset`/`config`/
    `overrides`); `resume` (as `seqep train --resume`: without `task` or `config` the run in `out` says
    what it is, and `preset` is ignored); `epochs`, `seed`, `estimator` (ep_symmetric → spiking_ep,
    cep → spiking_cep), `no_progress`; and, when the caller defines them, `timesteps`, `coding`, `limit`, `json`.
    """
    from spiking_ep.train.trainer import ANALOG_TO_SPIKING

    resume = bool(getattr(args, "resume", False))
    init, task, config = getattr(args, "init", None), getattr(args, "task", None), getattr(args, "config", None)
    argv = ["spiking-train", *([init] if init else []), "--out", args.out, *(["--resume"] if resume else [])]
    if not init:
        if not resume or task or config:
            argv += ["--from-scratch"]
        if not resume or task:
            argv += ["--task", task or "imdb", "--preset", getattr(args, "preset", None) or "smoke"]
        argv += ["--config", config] if config else []
        argv += [a for o in getattr(args, "overrides", None) or [] for a in ("--set", o)]
    estimator = getattr(args, "estimator", None)
    if estimator:
        if estimator not in ANALOG_TO_SPIKING:
            raise ConfigError(f"the spiking backend learns with {', '.join(ANALOG_TO_SPIKING)}, not {estimator!r}")
        argv += ["--estimator", ANALOG_TO_SPIKING[estimator]]
    for flag in ("epochs", "seed", "timesteps", "coding", "limit"):
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    argv += ["--no-progress"] if getattr(args, "no_progress", False) else []
    argv += ["--json"] if getattr(args, "json", False) else []
    parser = argparse.ArgumentParser(prog="seqep")
    spiking_train.register(parser.add_subparsers())
    return run_spiking_train(parser.parse_args(argv))
