"""The life of a run directory, shared by the analog and the spiking trainer.

open a new run or resume one (`RunDir`), refuse a resume whose config changed what is learned
(`refuse_changes`), save and load `checkpoints/last.pt` atomically with the training `Progress`,
cut metrics.jsonl back to the checkpoint's position on resume (so no row is recorded twice), and hold
the directory's lock (`run_lock`) while a process writes it.

    RUN_DIR/config.json, metrics.jsonl, checkpoints/{best,last}.pt, report.json, plots/, run.lock
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet
from analog_ep.train import run_lock
from analog_ep.train.checkpoint import LAST, load_checkpoint, save_model
from analog_ep.train.run_dir import append_jsonl, read_jsonl, write_json


class NothingToResume(ConfigError):
    """`--resume` pointed at a directory without a checkpoint to continue."""


@dataclass
class EpochTally:
    """Running numbers of the epoch in progress, saved with it, so that an epoch resumed half-way still
    reports all its batches in its "epoch" row."""

    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    spikes_sum: float = 0.0  # spiking runs: spikes per sample × samples
    max_residual: float = 0.0  # analog runs: the largest final free-phase residual
    seconds: float = 0.0  # training seconds of this epoch spent in earlier processes

    def add(self, output: torch.Tensor, y: torch.Tensor, loss: float, spikes: float = 0.0,
            residual: float = 0.0) -> None:
        self.add_counts(len(y), int((output.argmax(-1) == y).sum()), loss * len(y), residual)
        self.spikes_sum += spikes * len(y)

    def add_counts(self, seen: int, correct: int, loss_sum: float, residual: float = 0.0) -> None:
        """A batch counted elsewhere (a data-parallel run's, summed over its ranks): as `add` of its outputs."""
        self.seen += seen
        self.correct += correct
        self.loss_sum += loss_sum
        self.max_residual = max(self.max_residual, residual)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)


@dataclass
class Progress:
    """Where a run stands, saved in `last.pt`: enough for a resumed run to go on as the uninterrupted one."""

    epoch: int = 0  # epoch in progress (0-based) = epochs completed
    batch: int = 0  # next batch within it
    step: int = 0  # optimiser steps so far (the "step" rows' counter)
    best_val: float = -1.0
    best_epoch: int = -1
    elapsed: float = 0.0  # training seconds before this process
    tally: EpochTally = field(default_factory=EpochTally)
    before: dict[str, Any] = field(default_factory=dict)  # spiking runs: the initial weights' test evaluation
    curve: list[dict[str, Any]] = field(default_factory=list)  # spiking runs: the epoch rows so far

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Progress:
        """From `to_dict`; also a spiking `last.pt` written before epochs could be resumed half-way
        ("seconds", no batch or tally)."""
        values = dict(raw)
        if "seconds" in values:
            values["elapsed"] = values.pop("seconds")
        values["tally"] = EpochTally(**values.get("tally", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lrs": …}} → {"train.lrs": …}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


MISSING = object()


def config_differences(saved: dict[str, Any], now: dict[str, Any],
                       resumable: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, value now) of every dotted key that differs, except the `resumable` ones."""
    old, new, skip = flatten(saved), flatten(now), set(resumable)
    return [(key, old.get(key, MISSING), new.get(key, MISSING)) for key in sorted(old.keys() | new.keys())
            if key not in skip and old.get(key, MISSING) != new.get(key, MISSING)]


def _setting(key: str, value: Any) -> str:
    return f"{key}=(absent)" if value is MISSING else f"{key}={json.dumps(value, default=str)}"


def refuse_changes(run_dir: str | Path, saved: dict[str, Any], now: dict[str, Any], resumable: Iterable[str],
                   show: Callable[[str, Any], str] = _setting, may_change: str | None = None) -> None:
    """A ConfigError naming each key whose value differs from the resumed run's and what may change:
    another learning problem is not a continuation. `show(key, value)` spells a setting the user's way,
    `may_change` the resumable ones (default: their keys)."""
    resumable = list(resumable)
    diffs = config_differences(saved, now, resumable)
    if not diffs:
        return
    changes = "; ".join(f"{show(k, new)}: the run was trained with {show(k, old)}" for k, old, new in diffs)
    may = may_change or ", ".join(resumable) or "nothing"
    raise ConfigError(f"{run_dir}: cannot resume with {changes}. Resume without these changes to continue the run "
                      f"as it was (only {may} may change), or start a new --out to train with them")


@dataclass
class RunDir:
    """A run directory opened for writing: `resume` continues its last.pt, otherwise it must not hold a run
    (unless `overwrite`). `resume_command` is what a user types to continue it."""

    path: Path
    resume: bool = False
    overwrite: bool = False
    resume_command: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.resume_command:
            self.resume_command = f"seqep train --out {shlex.quote(str(self.path))} --resume"
        self.check()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / LAST

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    def check(self) -> None:
        """Refuse a directory another process writes, a resume with nothing saved, and a run started over
        an existing one."""
        run_lock.check_unlocked(self.path)
        if self.resume and not self.last.exists():
            raise NothingToResume(nothing_to_resume(self.path))
        if not (self.resume or self.overwrite) and self.last.exists():
            raise ConfigError(f"{self.path} already holds a run: add --resume to continue it "
                              f"({self.resume_command}), or pick another --out")

    def start(self) -> None:
        """Lock the directory, check again under the lock, and for a new run begin an empty metrics.jsonl."""
        run_lock.acquire(self.path)
        try:
            self.check()
        except Exception:
            run_lock.release(self.path)
            raise
        if not self.resume:
            self.metrics.unlink(missing_ok=True)

    def close(self) -> None:
        run_lock.release(self.path)

    # ---------------------------------------------------------------- files
    def log(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics, row)

    def write_json(self, name: str, obj: Any) -> None:
        write_json(self.path / name, obj)

    def save_checkpoint(self, which: str, net: EPNet, **extra: Any) -> None:
        save_model(self.checkpoints / which, net, **extra)

    # ---------------------------------------------------------------- last.pt
    def save_last(self, net: EPNet, progress: Progress, **extra: Any) -> None:
        """Atomically: weights, `progress`, torch's RNG and metrics.jsonl's length (the resume point)."""
        size = self.metrics.stat().st_size if self.metrics.exists() else 0
        save_model(self.last, net, progress=progress.to_dict(), rng=torch.get_rng_state(), metrics_bytes=size,
                   **extra)

    def load_last(self) -> tuple[dict[str, Any], Progress]:
        """(the last.pt dict, its Progress). Once the trainer has accepted it, `continue_metrics(ckpt)`."""
        ckpt = load_checkpoint(self.last)
        return ckpt, Progress.from_dict(ckpt.get("progress") or {})

    def continue_metrics(self, ckpt: dict[str, Any]) -> None:
        """Cut metrics.jsonl back to where `ckpt` was written: drop the rows logged after it (a killed
        process's), which the resumed run logs again. A last.pt without the file's length: drop "step" rows
        past its step and "epoch" rows past its epoch."""
        size, progress = ckpt.get("metrics_bytes"), Progress.from_dict(ckpt.get("progress") or {})
        if not self.metrics.exists():
            return
        if size is not None:
            if self.metrics.stat().st_size > size:
                os.truncate(self.metrics, size)
            return
        rows = [r for r in read_jsonl(self.metrics)
                if not (r.get("kind") == "step" and r.get("step", 0) > progress.step
                        or r.get("kind") == "epoch" and r.get("epoch", 0) > progress.epoch)]
        tmp = self.metrics.with_name(f".{self.metrics.name}.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        os.replace(tmp, self.metrics)

    def interrupted_message(self, progress: Progress) -> str:
        return (f"interrupted: progress saved at epoch {progress.epoch + 1} batch {progress.batch} (step "
                f"{progress.step}) in {self.last}; continue with `{self.resume_command}`")


def nothing_to_resume(run_dir: str | Path) -> str:
    """The one message for a resume with no last.pt: why (never started, or stopped before its first
    checkpoint) and how to start over."""
    run_dir = Path(run_dir)
    why = ("the run stopped before its first checkpoint, so nothing was saved yet" if (run_dir / "config.json").exists()
           else "no run was started there" if not run_dir.exists() else "it holds no run")
    return (f"nothing to resume in {run_dir} (no checkpoints/{LAST}: {why}). Start the run afresh: the same "
            "command without --resume (the directory is reused)")
