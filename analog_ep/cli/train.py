"""`seqep train` and `seqep evaluate`: presets from smoke to paper, run directories, resume."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from analog_ep.estimators import ESTIMATORS
from analog_ep.train.config import PRESETS, RunConfig, apply_overrides, load_preset, load_toml

TRAIN_EPILOG = """\
examples:
  seqep train --task imdb --preset smoke --out runs/imdb-smoke        # ~3 minutes on a 2-core CPU
  seqep train --task imdb --preset cpu --out runs/imdb-cpu            # the CPU accuracy preset
  seqep train --task snli --preset cpu --estimator bptt --out runs/snli-bptt
  seqep train --task imdb --preset smoke --set ep.beta=0.2 --set train.lrs=[1e-3] --out runs/b02
  seqep train --task imdb --preset smoke --set model.learn_embeddings=true --out runs/learned  # learned vectors
  seqep train --task imdb --preset smoke --vectors random:50 --set model.learn_embeddings=true --out runs/scratch
  seqep train --out runs/imdb-cpu --resume                            # continue an interrupted run
  seqep train --backend spiking --init runs/imdb-smoke --out runs/spk-ft --timesteps 16   # spiking EP fine-tuning
  seqep train --backend spiking --task imdb --preset smoke --set data.train_limit=2000 --out runs/spk  # from scratch

Presets are TOML files in experiments/presets/ (TASK-PRESET.toml); --config FILE uses your own.
ep.precision is auto by default: the fastest faithful mode on this machine (fp32, bf16, or int8 with our AMX
or AVX2 kernels), from a few seconds' calibration cached per machine; config.json records the mode and why.
--set ep.precision=fp32 runs the exact path; int8 is refused where neither of our int8 kernel sets loads
(int8-library runs oneDNN's anyway), bf16 on a CPU without bf16 instructions (bf16-emulated runs it anyway;
both are many times slower than fp32); with our AVX2 kernels, int8 where the exact path folds the first synapse
(SNLI) runs the folded exact path instead, and says so (--set ep.fold_keys=off runs int8 there).
A run directory holds config.json, metrics.jsonl, checkpoints/{best,last}.pt, report.json, plots/,
and run.lock while a process writes it (a second process on the same --out is refused).
Ctrl-C or SIGTERM finishes the batch in progress, saves checkpoints/last.pt and prints the --resume
command (exit status 130 / 143); last.pt is also written every train.checkpoint_minutes (and every
train.checkpoint_every steps), so even a killed run resumes from its last checkpoint, exactly.
--backend spiking hands the run to the spiking backend (spike-driven EP; --estimator cep = spiking C-EP):
the same as `seqep spiking-train`, which has the full set of spiking options (see its --help).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train an EP (or BPTT) model into a run directory",
                              description="Train a sequence classifier with EP and write a run directory.",
                              epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["imdb", "snli"], help="data set (required unless --resume or --config)")
    p.add_argument("--preset", choices=PRESETS, default="smoke", help="experiments/presets/TASK-PRESET.toml")
    p.add_argument("--config", metavar="FILE.toml", help="a config file instead of a preset")
    p.add_argument("--estimator", choices=ESTIMATORS, help="gradient estimator (default: the preset's)")
    p.add_argument("--vectors", help="word vectors: glove50, w2v:300, a file path, random:50, or a gensim name (with "
                                      "model.learn_embeddings=true they initialise a table EP learns)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu or cuda")
    p.add_argument("--data-dir", help="data directory (default: $SEQEP_DATA_DIR, else the Hugging Face hub)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. ep.beta=0.2 (repeatable)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--backend", default="analog",
                   help="analog (default), or an installed training backend such as spiking (spiking_ep)")
    spiking = p.add_argument_group("spiking backend (--backend spiking)")
    spiking.add_argument("--init", metavar="RUN_DIR", help="an analog run to convert and fine-tune "
                         "(absent: train a spiking network from scratch from --task/--preset)")
    spiking.add_argument("--timesteps", type=int, help="T of the spiking free phase (default 16)")
    spiking.add_argument("--coding", help="spiking unit model (default if)")
    spiking.add_argument("--limit", type=int, help="training samples per epoch")
    spiking.add_argument("--json", action="store_true", help="print the spiking report as JSON")
    p.set_defaults(handler=run_train)

    e = subparsers.add_parser("evaluate", help="accuracy of a trained run on a split",
                              description="Evaluate a run's best checkpoint (free-phase prediction).",
                              epilog="example:\n  seqep evaluate runs/imdb-smoke --split test --json",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir")
    e.add_argument("--split", choices=["test", "val", "train"], default="test")
    e.add_argument("--backend", default="analog",
                   help="analog (default), or an installed backend such as spiking (spiking_ep)")
    e.add_argument("--timesteps", help="spiking backend: comma-separated T values, e.g. 32,64,128,256")
    e.add_argument("--limit", type=int, help="spiking backend: first N samples only")
    e.add_argument("--json", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(handler=run_evaluate)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    from analog_ep.train.run_dir import load_run_config

    if args.resume and not args.config and not args.task:
        cfg = load_run_config(args.out)
    elif args.config:
        cfg = load_toml(args.config)
    else:
        if not args.task:
            from analog_ep.errors import ConfigError

            raise ConfigError("--task is required (imdb or snli), unless --config FILE or --resume is given")
        cfg = load_preset(args.task, args.preset)
    flags = {"ep.estimator": args.estimator, "data.vectors": args.vectors, "train.epochs": args.epochs,
             "train.seed": args.seed, "train.device": args.device, "data.data_dir": args.data_dir}
    overrides = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return apply_overrides(cfg, overrides + list(args.overrides))


def run_train(args: argparse.Namespace) -> int:
    from analog_ep.train import distributed
    from analog_ep.train.trainer import train_run

    if args.backend != "analog":
        if distributed.launched_by_torchrun():
            from analog_ep.errors import ConfigError

            raise ConfigError(f"--backend {args.backend} trains in one process: run it without torchrun "
                              "(data-parallel training is the analog backend's)")
        return other_backend(args.backend, group="seqep.train_backends")(args)
    spiking_only = [f"--{f}" for f in ("init", "timesteps", "coding", "limit") if getattr(args, f) is not None]
    if spiking_only:
        from analog_ep.errors import ConfigError

        raise ConfigError(f"{', '.join(spiking_only)} only apply with --backend spiking")
    cfg = resolve_config(args)
    command = "seqep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = train_run(cfg, args.out, resume=args.resume, progress=not args.no_progress, command=command)
    except KeyboardInterrupt as stopped:  # last.pt saved (or kept) and the resume command printed
        return getattr(stopped, "exit_code", 130)
    if distributed.launch_rank() != 0:  # under torchrun rank 0 alone reports
        return 0
    print(f"\n{report['task']} · {report['estimator']} · {report['epochs_completed']:.2f} epochs in "
          f"{report['train_minutes']:.1f} min\n"
          f"  val accuracy  {report['val_accuracy']:.4f}  (best epoch {report['best_epoch']})\n"
          f"  test accuracy {report['test_accuracy']:.4f}  (n = {report['n_test']})\n"
          f"  run directory {args.out}  (report.json, metrics.jsonl, plots/training.png)")
    return 0


def other_backend(name: str, group: str = "seqep.backends"):
    """A backend registered by another package: evaluation (`seqep.backends`) or training
    (`seqep.train_backends`) entry points, each a function of the parsed arguments returning an exit code."""
    from importlib.metadata import entry_points

    from analog_ep.errors import ConfigError

    found = {e.name: e for e in entry_points(group=group)}
    if name not in found:
        raise ConfigError(f"unknown backend {name!r}; installed: analog, {', '.join(sorted(found)) or 'none'}")
    return found[name].load()


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    if args.backend != "analog":
        return other_backend(args.backend)(args)

    from analog_ep.train import distributed
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.run_dir import load_run_config
    from analog_ep.train.trainer import evaluate_split, load_run_data

    # under torchrun each rank evaluates its part of the split and all gather the whole split's numbers
    with distributed.session(load_run_config(args.run_dir).train.device) as world:
        with distributed.main_first():  # rank 0 fills the data cache, the others read it
            cfg, task, embedding = load_run_data(args.run_dir, progress=not args.no_progress and world.is_main)
        device = f"cuda:{world.local_rank}" if world.backend == "nccl" else cfg.train.device
        net, ckpt = load_model(args.run_dir)
        net = net.to(device=device, dtype=getattr(torch, cfg.train.dtype))
        result = evaluate_split(net, task.splits[args.split], embedding.to(device), cfg,
                                progress=not args.no_progress and world.is_main, desc=args.split)
    if not world.is_main:
        return 0
    result.pop("predictions")
    result["world_size"] = world.size
    result.update(split=args.split, backend="analog", run_dir=str(Path(args.run_dir)),
                  checkpoint_epoch=ckpt.get("epoch"))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.split} accuracy {result['accuracy']:.4f} on {result['n']} samples ({result['seconds']:.1f} s)")
    return 0
