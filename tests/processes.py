"""Run, kill and read real `seqep` processes: what the interruption tests of both backends share."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# IMDB with tiny limits: 6 batches an epoch, 2 epochs; last.pt after every step, so a kill lands after a
# mid-epoch checkpoint (and sometimes between a step's metrics row and its checkpoint)
TINY = ["data.train_limit=192", "data.eval_limit=64", "data.max_len=32", "model.hidden=[8, 4]",
        "model.pool_queries=2", "ep.free_steps=10", "ep.nudge_steps=4", "train.batch_size=32", "train.epochs=2",
        "train.eval_batch_size=64", "train.log_every=1", "train.checkpoint_every=1",
        "ep.precision=fp32"]  # the exact path, named: a mode chosen per machine could differ between processes
BATCHES_PER_EPOCH = 6
WALL_CLOCK = {"seconds_per_batch", "epoch_seconds", "val_seconds", "elapsed_minutes"}

def seqep(*args: str) -> list[str]:
    """The installed `seqep` command (the console script beside this Python), as a user runs it."""
    script = Path(sys.executable).with_name("seqep")
    prefix = [str(script)] if script.exists() else [sys.executable, "-c",
                                                    "import sys; from analog_ep.cli import main; sys.exit(main())"]
    return [*prefix, *args]


def train_command(out: Path, *overrides: str) -> list[str]:
    """`seqep train` on the TINY config; `overrides` (KEY=VALUE, applied after TINY's) change it."""
    settings = [a for o in (*TINY, *overrides) for a in ("--set", o)]
    return seqep("train", "--task", "imdb", "--preset", "smoke", *settings, "--out", str(out), "--no-progress")


def step_rows(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"kind": "step"' in line)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"seqep train ended (rc {proc.returncode}) before the kill: {proc.stderr.read()}")
        assert time.monotonic() < deadline, "seqep train did not get there in time"
        time.sleep(0.02)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)
