"""One frontier over finished runs from any number of sweeps: accuracy vs training minutes, and a table.

Why: each sweep draws its own frontier; the question "what did every variant tried buy, for how much
time?" needs them on one plot. A run argument is LABEL=PATTERN, where PATTERN is a run directory or a
glob matching several (the seeds of one variant); runs without report.json are skipped.

    python experiments/frontier.py --out frontier-imdb.png \\
        --run "attention (preset)=runs/sweep-imdb-cpu/pooled-attention-seed*" \\
        --run "mean pooling=runs/sweep-imdb-cpu/mean-pool-seed*"

Prints a markdown table: label, runs, test accuracy mean ± std, validation, minutes per run.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from sweep import fmt, summarise

from analog_ep.train.plots import plot_frontier


def parse_run(text: str) -> tuple[str, list[Path]]:
    label, sep, pattern = text.rpartition("=")  # the label may hold "=", a path rarely does
    if not sep or not label or not pattern:
        raise SystemExit(f"--run must look like LABEL=RUN_DIR_OR_GLOB, got {text!r}")
    dirs = [Path(d) for d in sorted(glob.glob(pattern)) if (Path(d) / "report.json").is_file()]
    if not dirs:
        raise SystemExit(f"--run {label!r}: no finished run (a directory with report.json) matches {pattern!r}")
    return label, dirs


def table(runs: dict[str, list[Path]]) -> str:
    lines = ["| variant | runs | test accuracy | val accuracy | minutes per run |", "|---|---|---|---|---|"]
    for label, dirs in runs.items():
        reports = [json.loads((d / "report.json").read_text()) for d in dirs]
        test = summarise([r["test_accuracy"] for r in reports])
        val = summarise([r["val_accuracy"] for r in reports])
        minutes = ", ".join(f"{r['train_minutes']:.1f}" for r in reports)
        lines.append(f"| {label} | {len(dirs)} | {fmt(test)} | {fmt(val)} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATTERN",
                   help="a variant: label and a run directory or glob of run directories (repeatable)")
    p.add_argument("--out", required=True, help="the plot (.png)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    runs = dict(parse_run(r) for r in args.run)
    print(table(runs))
    print(f"\nfrontier plot: {plot_frontier(runs, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
