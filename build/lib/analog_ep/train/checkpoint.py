"""Atomic checkpoints of an EP model: spec + weights + whatever the trainer needs to resume.

A checkpoint is a `torch.save`d dict: {"format": 1, "spec": GraphSpec dict, "model": state_dict,
**extra}. Tensors are saved on CPU, so a model trained on CUDA loads on a CPU-only machine.

Checkpoints hold tensors and plain data only (dicts, lists, numbers, strings), and are read with
`torch.load(..., weights_only=True)`: a file someone shared cannot run code when it is opened. A file
that holds any other pickled object is refused with the reason; `convert_trusted_checkpoint` (the
`seqep checkpoint-convert --trust` command) rewrites such a file once, for a user who trusts it.
"""

from __future__ import annotations

import os
import pickle
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


def _read_weights_only(file: Path) -> Any:
    """torch.load restricted to tensors and plain containers; a pickled object is refused, never built."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{file} holds a pickled Python object, which seqep does not unpickle (opening it could run code). "
            f"If you trust where it came from, convert it once: seqep checkpoint-convert --trust {file}"
            f" (loader said: {str(err).splitlines()[0]})") from err
    except Exception as err:  # truncated or not a torch file
        raise CheckpointError(f"cannot read checkpoint {file}: {err}. Re-train or pick another checkpoint.") from err


def load_checkpoint(path: str | Path, which: str = BEST) -> dict:
    """The checkpoint dict of a file or run directory, read without running any code it may hold."""
    file = resolve_checkpoint(path, which)
    ckpt = _read_weights_only(file)
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
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError) as err:
        raise CheckpointError(f"checkpoint {path} does not match this version of seqep's model "
                              f"({type(err).__name__}: {err}): re-train, or pick another checkpoint") from err
    return net.to(device), ckpt


def _plain(obj: Any) -> Any:
    """Tensors and plain containers only: numpy arrays become tensors, tuples lists, anything else refused."""
    import numpy as np

    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    raise CheckpointError(f"cannot convert a {type(obj).__name__} to plain data: this is not a seqep checkpoint")


def convert_trusted_checkpoint(src: str | Path, dst: str | Path | None = None) -> Path:
    """Rewrite a checkpoint that holds pickled objects as tensors + plain data (loadable with weights_only).

    This *does* unpickle `src` (it may run code): call it only on files whose origin you trust.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    try:
        ckpt = torch.load(src, map_location="cpu", weights_only=False)  # explicit trust: the one exception
    except Exception as err:
        raise CheckpointError(f"cannot read {src}: {err}") from err
    if not isinstance(ckpt, dict) or "spec" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{src} is not a seqep checkpoint (a dict with 'spec' and 'model')")
    atomic_torch_save(_plain(ckpt), dst)
    _read_weights_only(dst)  # what was written must load the safe way
    return dst
