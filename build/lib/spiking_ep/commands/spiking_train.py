"""`seqep spiking-train`: fine-tune a run (or train from scratch) with spike-driven EP / C-EP into a run directory."""

from __future__ import annotations

import argparse
import json
from typing import Any

from analog_ep.errors import ConfigError
from spiking_ep.attention import ATTENTION_MODES
from spiking_ep.commands.options import add_command, command_line
from spiking_ep.train.trainer import (
    CONTROL_ESTIMATOR,
    LEARNING_CODINGS,
    LIMIT_DEFAULTS,
    SPIKING_ESTIMATORS,
    SpikingTrainConfig,
    finetune_spiking,
    read_resumable,
    resume_options,
    train_spiking_from_scratch,
)

EPILOG = """\
examples:
  seqep spiking-train runs/imdb --out runs/imdb-spiking-ft --timesteps 16 --epochs 1 --limit 2000
  seqep spiking-train runs/imdb --out runs/imdb-cep-ft --estimator spiking_cep --timesteps 16
  seqep spiking-train --from-scratch --task imdb --preset smoke --set data.train_limit=2000 \\
      --set model.hidden=[40,10] --out runs/imdb-spiking-scratch --epochs 3 --timesteps 32
  seqep spiking-train --out runs/imdb-spiking-scratch --resume --epochs 5   # continue it, 2 more epochs

Fine-tunes RUN_DIR's best checkpoint (or, with --from-scratch, a fresh network from a preset) with
spike-driven EP: IF units, free phase T = --timesteps (also the readout step it is evaluated at), nudged
phases T/2. Test accuracy at T (and --eval-timesteps) before and after; OUT is a run directory
(config.json, spiking.json, metrics.jsonl, checkpoints/, report.json, plots/) that `seqep spiking-eval`
and `seqep evaluate` read. Ctrl-C or SIGTERM stops after the batch in progress and saves checkpoints/last.pt
(weights, optimiser, progress); --resume continues OUT from the batch where it stopped, with OUT's own
configuration: only --epochs may change. docs/spiking.md,
"Training with spikes".
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    # the options that shape the learning problem default to None, so that --resume can tell a flag given
    # (checked against the run being resumed) from one left out (the run's own value); defaults in the help
    t = add_command(subparsers, "spiking-train", "fine-tune a run (or train from scratch) with spike-driven EP",
                    "Train with spike-driven EP / C-EP and write a run directory.", EPILOG)
    t.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="analog run to fine-tune (not with --from-scratch)")
    t.add_argument("--out", required=True, help="run directory to write (with --resume: to continue)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from where it stopped (last.pt), with its own configuration "
                        "(RUN_DIR / --from-scratch optional; only --epochs may change)")
    t.add_argument("--from-scratch", action="store_true", help="a fresh network from --task/--preset (or --config)")
    t.add_argument("--task", choices=["imdb", "snli"], help="--from-scratch: data set (default imdb)")
    t.add_argument("--preset", help="--from-scratch: experiments/presets/TASK-PRESET.toml (default smoke)")
    t.add_argument("--config", metavar="FILE.toml", help="--from-scratch: a config file instead of a preset")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="--from-scratch: override a config value, e.g. data.train_limit=2000 (repeatable)")
    t.add_argument("--epochs", type=int, help="epochs in all (default 1; with --resume: the run's, or more)")
    t.add_argument("--timesteps", type=int, help="T: free phase and readout step (default 16)")
    t.add_argument("--eval-timesteps", help="more T values for the before/after test table, e.g. 8,32")
    t.add_argument("--estimator", choices=(*SPIKING_ESTIMATORS, CONTROL_ESTIMATOR),
                   help="spiking_ep (default) / spiking_cep: spike-driven EP / C-EP, or analog_ep: the control "
                        "(analog EP, spiking evaluation)")
    t.add_argument("--coding", choices=LEARNING_CODINGS, help="unit model (default if)")
    t.add_argument("--tau", type=float, help="trace time constant in steps (default 8)")
    t.add_argument("--attention", choices=ATTENTION_MODES,
                   help="winner rule of the Hopfield layer (default herd; dense with --from-scratch)")
    t.add_argument("--beta", type=float, help="nudging strength (default 0.2)")
    t.add_argument("--nudge-steps", type=int, help="nudged phase length (default T/2)")
    t.add_argument("--lr-scale", type=float, help="× the run's learning rates (0.1 fine-tuning, 1 scratch)")
    t.add_argument("--batch-size", type=int, help="default 32")
    t.add_argument("--limit", type=int, help="training samples per epoch (default: the whole train split)")
    t.add_argument("--eval-limit", type=int, help="random N val/test samples (default 1000)")
    t.add_argument("--analog-steps", type=int,
                   help="analog free phase of the evaluations' reference and of --estimator analog_ep (default 100)")
    t.add_argument("--seed", type=int, help="default 0")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the report as JSON")
    t.set_defaults(handler=run_spiking_train)


# SpikingTrainConfig fields with a spiking-train flag of the same name
_TRAIN_FLAGS = ("timesteps", "nudge_steps", "beta", "estimator", "coding", "tau", "attention", "epochs",
                "batch_size", "lr_scale", "analog_steps", "seed")


def _train_config(args: argparse.Namespace) -> tuple[Any, dict[str, int | None]]:
    """(SpikingTrainConfig, {"limit", "eval_limit"}) from the flags given; with --resume, the run's own,
    the flags given checked against them (`resume_options`: a ConfigError names the one that differs)."""
    given: dict[str, Any] = {k: getattr(args, k) for k in _TRAIN_FLAGS if getattr(args, k) is not None}
    if args.eval_timesteps is not None:
        try:
            given["eval_timesteps"] = tuple(int(t) for t in args.eval_timesteps.split(",") if t.strip())
        except ValueError:
            raise ConfigError(f"--eval-timesteps must be comma-separated integers, got {args.eval_timesteps!r}") \
                from None
    limits = {k: getattr(args, k) for k in LIMIT_DEFAULTS if getattr(args, k) is not None}
    if args.resume:
        return resume_options(args.out, **given, **limits)
    given.setdefault("lr_scale", 1.0 if args.from_scratch else 0.1)
    return SpikingTrainConfig(**given), {**LIMIT_DEFAULTS, **limits}


def run_spiking_train(args: argparse.Namespace) -> int:
    if (args.from_scratch and args.run_dir) or not (args.resume or args.from_scratch or args.run_dir):
        raise ConfigError("give RUN_DIR (fine-tune an analog run) or --from-scratch (a fresh network), not both"
                          " (with --resume, either or neither: the run in --out says which it is)")
    from_scratch = args.from_scratch or (args.resume and not args.run_dir
                                         and "source_run" not in read_resumable(args.out))
    (cfg, limits), progress, command = _train_config(args), not args.no_progress, command_line(args)
    options = dict(limit=limits["limit"], eval_limit=limits["eval_limit"], cfg=cfg, progress=progress,
                   command=command, resume=args.resume)
    try:
        if from_scratch:
            report = train_spiking_from_scratch(args.out, args.task, args.preset, args.overrides, config=args.config,
                                                **options)
        else:
            report = finetune_spiking(args.run_dir, args.out, **options)
    except KeyboardInterrupt as err:  # the trainer saved last.pt and printed the resume command
        return getattr(err, "exit_code", 130)
    if args.json:
        print(json.dumps(report))
        return 0
    b, a = report["before"], report["after"]
    print(f"{report['mode']} · {report['estimator']} · {cfg.coding} τ={cfg.tau:g} · {cfg.epochs} epoch(s) on "
          f"{report['n_train']} samples in {report['train_minutes']:.1f} min; test n = {report['n_test']}")
    print(f"{'T':>6} {'before':>8} {'after':>8}")
    for T in sorted(a["accuracy"], key=int):
        print(f"{T:>6} {100 * b['accuracy'][T]:>7.2f}% {100 * a['accuracy'][T]:>7.2f}%")
    print(f"{'analog':>6} {100 * b['analog_accuracy']:>7.2f}% {100 * a['analog_accuracy']:>7.2f}%")
    print(f"run directory {args.out} (report.json, metrics.jsonl, plots/spiking_before_after.png)")
    return 0
