"""`seqep convert`, `spiking-eval`, `spiking-train`, `compare`, `export-nir` and `demo`: the spiking backend.

Registered through the `seqep.commands` entry point (pyproject.toml), so `analog_ep` never imports us.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError, DataError
from spiking_ep.attention import ATTENTION_MODES
from spiking_ep.convert import SPIKING_CONFIG, load_spiking, save_spiking_config
from spiking_ep.units.neurons import CODINGS

ALL_CODINGS = (*CODINGS, "snntorch", "norse")

CONVERT_EPILOG = """\
examples:
  seqep convert runs/imdb                         # sigma-delta units, θ = 1/32 (the default)
  seqep convert runs/imdb --coding if --tau 16    # integrate-and-fire units (the coding to learn with)
  seqep convert runs/imdb --coding bernoulli --attention sample --seed 1

Writes RUN_DIR/spiking.json (the spiking options); the weights stay in RUN_DIR/checkpoints/best.pt,
which may come from a CUDA run: it is loaded on the CPU.
"""

EVAL_EPILOG = """\
examples:
  seqep spiking-eval runs/imdb --timesteps 32,64,128,256 --json
  seqep spiking-eval runs/imdb --limit 1000 --plot runs/imdb/plots/spiking_accuracy.png
  seqep spiking-eval runs/tiny --data test_set.pt       # a torch file {"x": (N,S,L,d), "y": (N,)}
  seqep spiking-eval runs/tiny --synthetic 256          # Gaussian tokens; labels = analog predictions

Data: --data FILE.pt, else --synthetic N, else the "data" section of RUN_DIR/config.json through
analog_ep.data.load_task (the --split split, test by default).
"""


def _add_unit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coding", choices=ALL_CODINGS, help="unit model (default: spiking.json's, else sigma_delta)")
    p.add_argument("--tau", type=float, help="synaptic trace time constant in steps (default 16)")
    p.add_argument("--attention", choices=ATTENTION_MODES, help="winner rule of the Hopfield layer")
    p.add_argument("--threshold", type=float, help="sigma-delta quantum θ (default 1/32)")
    p.add_argument("--seed", type=int, help="random seed of Bernoulli units / sampled attention")


def _unit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(args, k) for k in ("coding", "tau", "attention", "seed")
                           if getattr(args, k) is not None}
    if args.threshold is not None:
        if (args.coding or "sigma_delta") != "sigma_delta":
            raise ConfigError("--threshold is the sigma-delta quantum: use it with --coding sigma_delta")
        out["coding_options"] = {"threshold": args.threshold}
    return out


def _spiking_from_args(args: argparse.Namespace) -> Any:
    """The run's spiking network with spiking.json's options, overridden by the unit flags."""
    overrides = _unit_overrides(args)
    snet = load_spiking(args.run_dir, **{k: v for k, v in overrides.items() if k != "coding_options"})
    if "coding_options" in overrides:
        snet = snet.with_options(coding_options=overrides["coding_options"])
    return snet


def _command_line(args: argparse.Namespace) -> str:
    """The command that produced a report: sys.argv under the `seqep` script, else a note."""
    if Path(sys.argv[0]).name in ("seqep", "__main__.py"):
        return "seqep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"seqep {getattr(args, 'command', '?')} {getattr(args, 'run_dir', '')} (via analog_ep.cli.main)".strip()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert a trained run to a spiking network (writes spiking.json)",
                              description=__doc__, epilog=CONVERT_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    _add_unit_options(p)
    p.add_argument("--json", action="store_true", help="print the written config as JSON")
    p.set_defaults(handler=run_convert)

    e = subparsers.add_parser("spiking-eval", help="spiking accuracy, agreement and spikes vs timesteps",
                              description=__doc__, epilog=EVAL_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    e.add_argument("--timesteps", default="32,64,128,256", help="comma-separated T values (default %(default)s)")
    _add_unit_options(e)
    e.add_argument("--readout", choices=["final", "window"], default="final",
                   help="output trace at T, or its mean over (T/2, T] (default final)")
    e.add_argument("--data", metavar="FILE.pt", help='torch file with "x" (N,S,L,d) and "y" (N,)')
    e.add_argument("--synthetic", type=int, metavar="N", help="N Gaussian inputs, labels = analog predictions")
    e.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the run's data")
    e.add_argument("--limit", type=int, help="evaluate N samples only: a seeded random subset (splits are stored "
                                             "by label)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--analog-steps", type=int, help="analog free-phase steps (default: config ep.free_steps×2, "
                                                     "else 100)")
    e.add_argument("--plot", metavar="FILE.png", help="accuracy-vs-T plot (default RUN_DIR/plots/spiking_accuracy.png)")
    e.add_argument("--out", metavar="FILE.json", help="also write the result here")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(handler=run_spiking_eval)
    _register_reports(subparsers)
    _register_training(subparsers)


def run_convert(args: argparse.Namespace) -> int:
    snet = _spiking_from_args(args)
    path = save_spiking_config(snet, args.run_dir)
    if args.json:
        print(json.dumps({"path": str(path), **snet.config()}))
    else:
        spec = snet.spec
        print(f"wrote {path}: {snet.coding_name} units, τ = {snet.tau}, attention {snet.attention.mode}; "
              f"network {spec.name} {' → '.join(spec.layer_names)} ({spec.num_projections} projection layer(s))")
    return 0


def run_spiking_eval(args: argparse.Namespace) -> int:
    from spiking_ep.evaluate import evaluate_spiking, plot_accuracy_vs_timesteps, read_run_config, timesteps_for_gap

    try:
        timesteps = sorted({int(t) for t in args.timesteps.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--timesteps must be comma-separated integers, got {args.timesteps!r}") from None
    if not timesteps or timesteps[0] < 2:
        raise ConfigError("--timesteps needs integers ≥ 2")
    run_dir = Path(args.run_dir)
    snet = _spiking_from_args(args)
    cfg = read_run_config(run_dir)
    ep_cfg = (cfg.get("config") or cfg).get("ep") or {}
    analog_steps = args.analog_steps or 2 * int(ep_cfg.get("free_steps") or 50)
    batches = _batches_from_args(args, snet, analog_steps)
    result = evaluate_spiking(snet, batches, timesteps, readout=args.readout, analog_steps=analog_steps)
    result["run_dir"] = str(run_dir)
    result["data"] = args.data or (f"synthetic:{args.synthetic}" if args.synthetic else f"run:{args.split}")
    result["timesteps_for_gap"] = {"1pp": timesteps_for_gap(result, 0.01), "0.5pp": timesteps_for_gap(result, 0.005)}
    plot = Path(args.plot) if args.plot else run_dir / "plots" / "spiking_accuracy.png"
    result["plot"] = str(plot_accuracy_vs_timesteps(result, None, plot))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        cfg_s = result["config"]
        print(f"{run_dir}: {result['samples']} samples, {cfg_s['coding']} units (τ = {cfg_s['tau']}, attention "
              f"{cfg_s['attention']}), analog accuracy {100 * result['analog']['accuracy']:.2f} %")
        print(f"{'T':>6} {'accuracy':>9} {'agreement':>10} {'spikes/sample':>14} {'max FC distance':>16}")
        for T, row in result["timesteps"].items():
            dist = max(v for k, v in row["distance_to_analog"].items() if k != "proj")
            print(f"{T:>6} {100 * row['accuracy']:>8.2f}% {100 * row['agreement']:>9.2f}% "
                  f"{row['spikes_per_sample']:>14.0f} {dist:>16.4f}")
        print(f"plot: {result['plot']}  (default config: {SPIKING_CONFIG} if present)")
    return 0


def _batches_from_args(args: argparse.Namespace, snet: Any, analog_steps: int) -> Any:
    """Embedded (x, y) batches from --data FILE.pt, --synthetic N or the run's data split (--split, --limit)."""
    from spiking_ep.evaluate import batches_from_run, batches_from_tensors

    dtype = snet.net.weights[0].dtype
    if args.data:
        try:
            blob = torch.load(args.data, map_location="cpu", weights_only=True)
            x, y = blob["x"].to(dtype), blob["y"].long()
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            raise DataError(f"cannot read {args.data} as a torch file with 'x' and 'y': {err}") from err
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        return batches_from_tensors(x, y, args.batch_size)
    if args.synthetic:
        from analog_ep.dynamics import predict

        spec = snet.spec
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.synthetic, spec.num_streams, spec.seq_len, spec.dim, generator=g).to(dtype)
        y = predict(snet.net, x, analog_steps)
        return batches_from_tensors(x, y, args.batch_size)
    return batches_from_run(args.run_dir, args.split, args.limit, args.batch_size)


def evaluate_backend(args: argparse.Namespace) -> int:
    """`seqep evaluate RUN_DIR --backend spiking [--timesteps ...]`: the same as `seqep spiking-eval`."""
    argv = ["spiking-eval", args.run_dir, "--split", args.split, "--timesteps", args.timesteps or "32,64,128,256"]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    if args.json:
        argv.append("--json")
    parser = argparse.ArgumentParser(prog="seqep")
    register(parser.add_subparsers())
    return run_spiking_eval(parser.parse_args(argv))


# ---------------------------------------------------------------- compare, export-nir, demo (issue 6)
COMPARE_EPILOG = """\
examples:
  seqep compare runs/demo                                   # T = 8,16,32,64; profiles cmos45nm and loihi
  seqep compare runs/imdb --timesteps 16,64,256 --limit 1000 --profile loihi
  seqep compare runs/imdb --profile my_chip.toml            # your own prices (format: energy/profiles/*.toml)
  seqep compare runs/tiny --synthetic 256 --coding if --tau 8

Writes RUN_DIR/compare/compare.json, compare.md (paste-ready tables: accuracy, spikes, energy per inference and
per training sample, break-even spike rate, the constants and their sources) and compare/plots/*.png.
Conventions and formulas: docs/energy.md.
"""

NIR_EPILOG = """\
examples:
  seqep export-nir runs/demo runs/demo/model.nir
  seqep export-nir runs/demo model.nir --check 256 --steps 256     # run it through norse against our reference

The graph: IF units (reset to 0, threshold 1), Affine W/2 + b/2 bottom-up and Linear Wᵀ/2 top-down per symmetric
synapse; the input is precomputed (the attention layer's output). Details: docs/energy.md, "NIR".
"""

DEMO_EPILOG = """\
stages: train (IMDB smoke preset; a finished run is reused, an interrupted one resumes), convert (sigma-delta),
compare (test subset, cmos45nm and loihi profiles), nir (export + norse round trip). Ctrl-C at any point and run
`seqep demo` again: finished stages are kept, `--skip compare,nir` skips stages.
Data: $SEQEP_DATA_DIR, else ../shared/data next to the repository.
"""


def _register_reports(subparsers: argparse._SubParsersAction) -> None:
    from spiking_ep.energy.compare import DEFAULT_PROFILES, DEFAULT_TIMESTEPS

    c = subparsers.add_parser("compare", help="analog vs spiking: accuracy, spikes and energy report with plots",
                              description="Accuracy, spike counts and energy of a run, analog vs spiking.",
                              epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt")
    c.add_argument("--timesteps", default=",".join(map(str, DEFAULT_TIMESTEPS)),
                   help="comma-separated T values (default %(default)s)")
    c.add_argument("--profile", action="append", metavar="NAME|FILE",
                   help=f"energy profile(s), comma-separated or repeated (default {','.join(DEFAULT_PROFILES)})")
    _add_unit_options(c)
    c.add_argument("--data", metavar="FILE.pt", help='torch file with "x" (N,S,L,d) and "y" (N,)')
    c.add_argument("--synthetic", type=int, metavar="N", help="N Gaussian inputs, labels = analog predictions")
    c.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the run's data")
    c.add_argument("--limit", type=int, help="N samples only: a seeded random subset (splits are stored by label)")
    c.add_argument("--batch-size", type=int, default=128)
    c.add_argument("--probe-samples", type=int, default=16,
                   help="samples for firing-rate histograms, raster and the training-step spikes (default 16)")
    c.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: faster than 2 for these small products on a shared CPU; 0: torch's)")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(handler=run_compare)

    n = subparsers.add_parser("export-nir", help="export the spiking FC part as a NIR graph (frozen, IF units)",
                              description="Export the frozen spiking fully connected part as a NIR graph.",
                              epilog=NIR_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    n.add_argument("run_dir", metavar="RUN_DIR", help="run directory with checkpoints/best.pt (or a .pt file)")
    n.add_argument("out", metavar="OUT.nir")
    n.add_argument("--check", type=int, default=0, metavar="N",
                   help="run the file with norse on N samples (the run's test split, else Gaussian inputs)")
    n.add_argument("--steps", type=int, default=256, help="timesteps of the check (default %(default)s)")
    n.add_argument("--json", action="store_true")
    n.set_defaults(handler=run_export_nir)

    d = subparsers.add_parser("demo", help="the whole job: train analog → convert → spiking eval → energy → NIR",
                              description="Train analog EP on IMDB (smoke preset), convert to spiking, compare "
                                          "accuracy, spikes and energy, export NIR; prints one table.",
                              epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("--out", default="runs/demo", help="run directory (default %(default)s)")
    d.add_argument("--timesteps", default="8,16,32,64", help="spiking T values (default %(default)s)")
    d.add_argument("--fresh", action="store_true", help="delete OUT (a run directory) and train again")
    d.add_argument("--limit", type=int, help="compare on N test reviews only, a seeded random subset (default: the "
                                             "preset's subset)")
    d.add_argument("--skip", default="", help="comma-separated stages to skip: train,convert,compare,nir")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the smoke model's products are small, and two threads oversubscribe "
                        "a shared 2-core CPU; 0: torch's default)")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    d.set_defaults(handler=run_demo_command)


def run_compare(args: argparse.Namespace) -> int:
    from spiking_ep.energy.compare import (
        DEFAULT_PROFILES,
        CompareOptions,
        compare_run,
        console_table,
        ep_settings,
        parse_timesteps,
    )

    snet = _spiking_from_args(args)
    profiles = [p for item in (args.profile or [",".join(DEFAULT_PROFILES)]) for p in item.split(",") if p.strip()]
    options = CompareOptions(parse_timesteps(args.timesteps), profiles, args.probe_samples, args.threads or None,
                             plots=not args.no_plots, progress=not args.no_progress, command=_command_line(args))
    batches = None
    if args.data or args.synthetic:
        ep = ep_settings(args.run_dir)
        batches = _batches_from_args(args, snet, ep.eval_free_steps or ep.free_steps)
        options.data = {"source": args.data or f"synthetic:{args.synthetic} (labels = analog predictions)",
                        "split": "file" if args.data else "synthetic", "limit": args.limit}
    report = compare_run(args.run_dir, snet, args.split, args.limit, args.batch_size, options, batches)
    if args.json:
        print(json.dumps(report))
    else:
        print(console_table(report))
    return 0


def run_export_nir(args: argparse.Namespace) -> int:
    from analog_ep.train.checkpoint import load_model
    from spiking_ep.nir_export import check_round_trip, export_nir, not_expressible_text

    net, _ = load_model(args.run_dir)
    export = export_nir(net, args.out, metadata={"source_run": str(args.run_dir)})
    result: dict[str, Any] = {"path": str(export.path), "nodes": export.nodes, "edges": export.edges}
    if args.check:
        from spiking_ep.energy.compare import torch_threads

        x, y = _nir_check_inputs(args, net)
        with torch_threads(1):
            result["check"] = check_round_trip(export.path, net, x, args.steps, y)
    if args.json:
        print(json.dumps(result))
        return 0
    print(export.summary())
    print("NIR cannot express these parts of the network; how the export handles them:")
    print(not_expressible_text())
    if "check" in result:
        c = result["check"]
        print(f"norse round trip ({c['samples']} samples × {c['steps']} steps): "
              f"{100 * c['identical_output_trains']:.1f} % identical output spike trains, max count difference "
              f"{c['max_count_difference']:.0f}; "
              f"predictions agree with the analog network on {100 * c['agreement_with_analog']:.1f} %")
    else:
        print(f"check it: seqep export-nir {args.run_dir} {args.out} --check 256")
    return 0


def _nir_check_inputs(args: argparse.Namespace, net: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if (Path(args.run_dir) / "config.json").is_file():
        from spiking_ep.evaluate import run_batches

        batches, _, _ = run_batches(args.run_dir, "test", args.check, args.check, progress=False)
        return next(batches)
    spec = net.spec
    g = torch.Generator().manual_seed(0)
    return torch.randn(args.check, spec.num_streams, spec.seq_len, spec.dim, generator=g), None


def run_demo_command(args: argparse.Namespace) -> int:
    from spiking_ep.demo import run_demo, summary_table
    from spiking_ep.energy.compare import parse_timesteps

    try:
        summary = run_demo(args.out, parse_timesteps(args.timesteps), fresh=args.fresh, limit=args.limit,
                           skip=[s.strip() for s in args.skip.split(",") if s.strip()], progress=not args.no_progress,
                           command=_command_line(args), threads=args.threads or None)
    except KeyboardInterrupt:
        print(f"\nseqep demo: interrupted; run `seqep demo --out {args.out}` again to continue (finished stages and "
              "the training checkpoint are kept)", file=sys.stderr)
        return 130
    print(json.dumps(summary) if args.json else summary_table(summary))
    return 0


# ---------------------------------------------------------------- spiking-train (issue 5: learning with spikes)
TRAIN_EPILOG = """\
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
and `seqep evaluate` read. --resume continues OUT after its last completed epoch (checkpoints/last.pt:
weights, optimiser, progress) with OUT's own configuration: only --epochs may change. docs/spiking.md,
"Training with spikes".
"""


def _register_training(subparsers: argparse._SubParsersAction) -> None:
    from spiking_ep.train.trainer import CONTROL_ESTIMATOR, LEARNING_CODINGS, SPIKING_ESTIMATORS

    # the options that shape the learning problem default to None, so that --resume can tell a flag given
    # (checked against the run being resumed) from one left out (the run's own value); defaults in the help
    t = subparsers.add_parser("spiking-train", help="fine-tune a run (or train from scratch) with spike-driven EP",
                              description="Train with spike-driven EP / C-EP and write a run directory.",
                              epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="analog run to fine-tune (not with --from-scratch)")
    t.add_argument("--out", required=True, help="run directory to write (with --resume: to continue)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last completed epoch, with its own configuration "
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
    from spiking_ep.train.trainer import LIMIT_DEFAULTS, SpikingTrainConfig, resume_options

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
    from spiking_ep.train.trainer import finetune_spiking, read_resumable, train_spiking_from_scratch

    if (args.from_scratch and args.run_dir) or not (args.resume or args.from_scratch or args.run_dir):
        raise ConfigError("give RUN_DIR (fine-tune an analog run) or --from-scratch (a fresh network), not both"
                          " (with --resume, either or neither: the run in --out says which it is)")
    from_scratch = args.from_scratch or (args.resume and not args.run_dir
                                         and "source_run" not in read_resumable(args.out))
    (cfg, limits), progress, command = _train_config(args), not args.no_progress, _command_line(args)
    options = dict(limit=limits["limit"], eval_limit=limits["eval_limit"], cfg=cfg, progress=progress,
                   command=command, resume=args.resume)
    try:
        if from_scratch:
            report = train_spiking_from_scratch(args.out, args.task, args.preset, args.overrides, config=args.config,
                                                **options)
        else:
            report = finetune_spiking(args.run_dir, args.out, **options)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last completed epoch is in {args.out}/checkpoints/last.pt; continue with "
              f"`seqep spiking-train --out {args.out} --resume`", file=sys.stderr)
        return 130
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
    _register_training(parser.add_subparsers())
    return run_spiking_train(parser.parse_args(argv))
