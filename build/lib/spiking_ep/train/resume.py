"""What `--resume` continues a spiking run with: the run's own config and data limits, flags checked against them.

The run directory's lifecycle (last.pt, metrics.jsonl, the lock) is `analog_ep.train.lifecycle`'s; this
module reads a spiking run's config.json and speaks of the `seqep spiking-train` flags.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from analog_ep.errors import ConfigError
from analog_ep.train import lifecycle, run_lock
from analog_ep.train.checkpoint import LAST, load_checkpoint
from analog_ep.train.run_dir import write_json
from spiking_ep.train.config import LIMIT_DEFAULTS, RESUMABLE_CHANGES, SpikingTrainConfig


def resume_command(out_dir: str | Path) -> str:
    return f"seqep spiking-train --out {out_dir} --resume"


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "(none)"
    return "(default)" if value is None or value is lifecycle.MISSING else str(value)


def _flag(key: str, value: Any) -> str:
    return f"--{key.replace('_', '-')} {_flag_value(value)}"


def refuse_changes(saved: dict[str, Any], given: dict[str, Any], run_dir: str | Path) -> None:
    """A ConfigError naming each of `given` that differs from the resumed run's `saved` option: another
    T, estimator, coding, β, batch or data subset is another learning problem, not a continuation."""
    common = {k: v for k, v in given.items() if k in saved}
    old = {k: saved[k] for k in common}
    for values in (common, old):
        if "eval_timesteps" in values:
            values["eval_timesteps"] = sorted(set(values["eval_timesteps"] or ()))
    lifecycle.refuse_changes(run_dir, old, common, RESUMABLE_CHANGES, show=_flag, may_change="--epochs")


def read_resumable(out_dir: str | Path) -> dict[str, Any]:
    """config.json of the spiking run in `out_dir` that `--resume` continues; NothingToResume saying what is missing."""
    out = Path(out_dir)
    run_lock.check_unlocked(out)
    missing = [name for name in ("config.json", f"checkpoints/{LAST}") if not (out / name).is_file()]
    if missing:
        raise lifecycle.NothingToResume(f"{lifecycle.nothing_to_resume(out)} (no {' and no '.join(missing)}; "
                                        "or point --out at the run to continue)")
    saved = json.loads((out / "config.json").read_text())
    if "spiking_train" not in saved:
        raise ConfigError(f"{out} is not a spiking run (config.json has no \"spiking_train\"): continue an analog "
                          f"run with `seqep train --out {out} --resume`")
    return saved


def resume_options(out_dir: str | Path, **given: Any) -> tuple[SpikingTrainConfig, dict[str, int | None]]:
    """What `--resume` continues with: config.json's `SpikingTrainConfig` and data limits ("limit",
    "eval_limit"), the explicitly `given` values checked against them (`refuse_changes`). Only `epochs`
    may change, and not below the epochs already completed."""
    saved = read_resumable(out_dir)
    cfg = SpikingTrainConfig.from_dict(saved["spiking_train"])
    limits = {k: saved[k] if k in saved else given.get(k, default) for k, default in LIMIT_DEFAULTS.items()}
    refuse_changes({**cfg.to_dict(), **limits}, given, out_dir)
    done = load_checkpoint(Path(out_dir) / "checkpoints" / LAST).get("progress", {}).get("epoch", 0)
    epochs = given.get("epochs", max(cfg.epochs, done))
    if epochs < done:
        raise ConfigError(f"{out_dir} has {done} completed epochs: resume with --epochs ≥ {done} (or without --epochs)")
    return dataclasses.replace(cfg, epochs=epochs), limits


def note_resume(out_dir: str | Path, cfg: SpikingTrainConfig, command: str) -> None:
    """config.json stays the run's own; a resume records its command and a raised epoch count."""
    path = Path(out_dir) / "config.json"
    saved = json.loads(path.read_text())
    saved["spiking_train"] = cfg.to_dict()
    saved["resumed"] = [*saved.get("resumed", []), command]
    write_json(path, saved)
