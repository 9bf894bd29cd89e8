"""Atomic checkpoints of an EP model: spec + weights + whatever the trainer needs to resume.

A checkpoint is a `torch.save`d dict: {"format": 1, "spec": GraphSpec dict, "model": state_dict,
**extra}. Tensors are saved on CPU, so a model trained on CUDA loads on a CPU-only machine.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import CheckpointError
from analog_ep.phi import EPNet, GraphSpec

FORMAT = 1
BEST, LAST = "best.pt", "last.pt"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temporary file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_model(path: str | Path, net: EPNet, **extra: Any) -> None:
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "spec": net.spec.to_dict(), "model": state, **extra}, path)


def resolve_checkpoint(path: str | Path, which: str = BEST) -> Path:
    """A checkpoint file, or a run directory (then `checkpoints/best.pt`, falling back to last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (which, LAST):
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"{path} has no checkpoints/{which} or checkpoints/{LAST}: is it a run directory "
                              "written by `seqep train --out DIR`?")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: pass a run directory or a .pt file")
    return path


def load_checkpoint(path: str | Path, which: str = BEST) -> dict:
    file = resolve_checkpoint(path, which)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {file}: {err}. Re-train or pick another checkpoint.") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "spec" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{file} is not a seqep checkpoint (format {FORMAT}) with 'spec' and 'model'")
    return ckpt


def load_model(path: str | Path, which: str = BEST, device: str | torch.device = "cpu") -> tuple[EPNet, dict]:
    """(EPNet with the saved weights, the whole checkpoint dict) from a file or a run directory."""
    ckpt = load_checkpoint(path, which)
    try:
        spec = GraphSpec.from_dict(ckpt["spec"])
        net = EPNet(spec)
        net.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this version of seqep's model: {err}") from err
    return net.to(device), ckpt
