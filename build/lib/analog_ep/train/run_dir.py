"""Run directories: where a training run keeps its config, metrics, checkpoints, report and plots.

    RUN_DIR/config.json          resolved RunConfig (+ the command line that made it)
    RUN_DIR/metrics.jsonl        one JSON object per logged step ("kind": "step") and per epoch ("epoch")
    RUN_DIR/checkpoints/best.pt  best-on-validation model (what `evaluate` and `convert` read)
    RUN_DIR/checkpoints/last.pt  model + optimiser + progress + metrics.jsonl's length, for --resume
    RUN_DIR/report.json          final numbers
    RUN_DIR/plots/*.png
    RUN_DIR/run.lock             pid and host of the process writing the run (`run_lock`)

Opening, resuming and checkpointing a run directory is `lifecycle.RunDir`'s job; this module writes its files.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from analog_ep.errors import ConfigError
from analog_ep.fast.native_kernels import cpu_model
from analog_ep.train.config import RunConfig


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=str) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.json: pass a directory written by `seqep train --out DIR`")
    raw = json.loads(path.read_text())
    return RunConfig.from_dict(raw["config"], source=str(path))


def source_commit() -> str | None:
    """The git commit of the seqep source this process runs ("+dirty" with uncommitted changes), or None
    outside a git checkout: every report names the code that made it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def software_versions() -> dict[str, str | None]:
    import numpy
    import torch

    import analog_ep

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
            "seqep": getattr(analog_ep, "__version__", "0.1.0"), "commit": source_commit(),
            "platform": platform.platform(), "processor": cpu_model(), "threads": str(torch.get_num_threads())}
