"""Seeds × variants of one preset, a few runs at a time, summarised as mean ± std.

Each run is a plain `seqep train` in its own process and run directory (so it can be inspected,
evaluated or resumed on its own); this script only schedules them and reads their report.json.
On a 2-core machine two runs with one thread each finish about as fast as one run with two
threads, and twice as much gets done.

    python experiments/sweep.py --task imdb --preset cpu --seeds 0,1,2 \\
        --variant pooled-attention= \\
        --variant no-attention="model.pool_queries=0 model.attention=false" \\
        --set train.max_minutes=15 --set train.epochs=12 --parallel 2 --out runs/sweep-imdb

Writes OUT/summary.json and OUT/summary.md (one row per variant: test and validation accuracy,
mean ± sample std over the seeds, epochs and minutes). Finished runs are skipped when re-run with
the same --out, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse_variant(text: str) -> tuple[str, list[str]]:
    """NAME=KEY=VALUE KEY=VALUE ... (NAME= alone: the preset unchanged)."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant must look like NAME=[KEY=VALUE ...], got {text!r}")
    return name, shlex.split(rest)


def run_command(args: argparse.Namespace, overrides: list[str], seed: int, out: Path) -> list[str]:
    cmd = ["seqep", "train", "--task", args.task, "--preset", args.preset, "--seed", str(seed),
           "--out", str(out), "--no-progress"]
    for o in [*args.overrides, *overrides]:
        cmd += ["--set", o]
    if (out / "config.json").exists():
        cmd.append("--resume")
    return cmd


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def fmt(stat: dict, scale: float = 100.0) -> str:
    if not stat["n"]:
        return "–"
    std = f" ± {stat['std'] * scale:.2f}" if stat["std"] is not None else " (1 seed)"
    return f"{stat['mean'] * scale:.2f}{std}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["imdb", "snli"], required=True)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default %(default)s)")
    p.add_argument("--variant", action="append", default=[], help="NAME=[KEY=VALUE ...] (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="override for every run")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default %(default)s)")
    p.add_argument("--out", required=True, help="sweep directory: one run directory per variant and seed")
    p.add_argument("--extra-run", action="append", default=[], metavar="LABEL=RUN_DIR",
                   help="another finished run to draw on the frontier plot (repeatable)")
    args = p.parse_args(argv)

    variants = [parse_variant(v) for v in args.variant] or [("preset", [])]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    jobs = [(name, ov, seed, root / f"{name}-seed{seed}") for name, ov in variants for seed in seeds]
    todo = [j for j in jobs if not (j[3] / "report.json").exists()
            or json.loads((j[3] / "report.json").read_text()).get("status") != "completed"]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    running: list[tuple[subprocess.Popen, Path]] = []
    print(f"{len(jobs)} runs, {len(jobs) - len(todo)} already done, {args.parallel} at a time", flush=True)
    while todo or running:
        while todo and len(running) < args.parallel:
            name, ov, seed, out = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            cmd = run_command(args, ov, seed, out)
            print(f"[{time.strftime('%H:%M:%S')}] start {out.name}: {shlex.join(cmd)}", flush=True)
            log = open(out / "sweep.log", "a")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out))
        time.sleep(5)
        for proc, out in list(running):
            if proc.poll() is not None:
                running.remove((proc, out))
                print(f"[{time.strftime('%H:%M:%S')}] done  {out.name}: exit {proc.returncode}", flush=True)

    rows, table = [], ["| variant | overrides | test accuracy | val accuracy | epochs (best) | minutes | seeds |",
                       "|---|---|---|---|---|---|---|"]
    for name, ov in variants:
        reports = [json.loads((root / f"{name}-seed{s}" / "report.json").read_text()) for s in seeds
                   if (root / f"{name}-seed{s}" / "report.json").exists()]
        reports = [r for r in reports if r.get("status") == "completed"]
        test = summarise([r["test_accuracy"] for r in reports])
        val = summarise([r["val_accuracy"] for r in reports])
        row = {"variant": name, "overrides": ov, "test_accuracy": test, "val_accuracy": val,
               "epochs": [r["epochs_completed"] for r in reports], "best_epoch": [r["best_epoch"] for r in reports],
               "train_minutes": [r["train_minutes"] for r in reports]}
        rows.append(row)
        epochs = ", ".join(f"{e:.1f} ({b})" for e, b in zip(row["epochs"], row["best_epoch"]))
        minutes = ", ".join(f"{m:.1f}" for m in row["train_minutes"])
        table.append(f"| {name} | `{' '.join(ov) or '(preset)'}` | {fmt(test)} | {fmt(val)} | {epochs} | "
                     f"{minutes} | {test['n']} |")
    command = "python experiments/sweep.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    (root / "summary.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    md = "\n".join([f"`{command}`", "", *table, ""])
    (root / "summary.md").write_text(md)
    print(md)

    from analog_ep.train.plots import plot_frontier

    curves: dict[str, list] = {name: [root / f"{name}-seed{s}" for s in seeds] for name, _ in variants}
    for extra in args.extra_run:
        label, _, run_dir = extra.partition("=")
        curves.setdefault(label, []).append(Path(run_dir))
    title = f"{args.task} '{args.preset}' preset: validation accuracy vs training minutes"
    print(f"frontier plot: {plot_frontier(curves, root / 'frontier.png', title)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
