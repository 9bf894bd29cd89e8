"""The benchmark's shapes (the paper and CPU presets, tiny test versions) and the batches it times.

Inputs: "real" is a seeded batch of the task's training split, embedded as training embeds it (the preset's
vectors, length and normalisation; needs the data, `SEQEP_DATA_DIR`); "random" is Gaussian (RMS 0.6 per
entry). Random vectors never repeat, so on them the fast path's retrieval over distinct keys does the full
L × L work, the worst case. "auto" is real where the shape's data is found, else random.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from analog_ep.data.ngrams import slots as ngram_slots
from analog_ep.errors import ConfigError, DataError
from analog_ep.models import build_spec
from analog_ep.phi import EPNet, GraphSpec
from analog_ep.train.config import load_preset

PAPER_SHAPES = ("imdb-paper", "snli-paper")
CPU_SHAPES = ("imdb-cpu", "snli-cpu")
TEST_SHAPES = ("imdb-tiny", "snli-tiny")  # seconds-sized, for tests and smoke checks
SHAPES = PAPER_SHAPES + CPU_SHAPES + TEST_SHAPES
DEFAULT_BATCHES = {"imdb-paper": (32, 128), "snli-paper": (256,)}  # others: the preset's batch size
DEFAULT_TOL = 1e-4  # early-exit residual tolerance where the preset sets none
INPUT_RMS = 0.6
INPUTS = ("auto", "real", "random")


@dataclass(frozen=True)
class Shape:
    name: str
    spec: GraphSpec
    beta: float
    free_steps: int
    nudge_steps: int
    tol: float | None  # the early-exit tolerance of this shape (used unless --no-early-exit)
    batches: tuple[int, ...]
    lrs: tuple[float, ...]


def vectors_dim(vectors: str) -> int:
    """Word-vector size from a preset's `data.vectors` (glove50 → 50, w2v:300 → 300, *-300 → 300)."""
    m = re.match(r"w2v:(\d+)", vectors) or re.search(r"(\d+)d?$", vectors)
    if not m:
        raise ValueError(f"cannot tell the dimension of vectors {vectors!r}")
    return int(m.group(1))


def build_shape(name: str) -> Shape:
    """A named benchmark shape: the paper and CPU presets (experiments/presets), or a tiny test shape."""
    if name in TEST_SHAPES:
        task = name.split("-")[0]
        beta, free, nudge = (0.1, 50, 25) if task == "imdb" else (0.5, 60, 30)
        spec = build_spec(task, tiny=True, bias_offset=1.0, schedule="synchronous")
        return Shape(name, spec, beta, free, nudge, DEFAULT_TOL, (8,), (1e-3,))
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    task, preset = name.split("-")
    cfg = load_preset(task, preset)
    m = cfg.model
    options: dict[str, Any] = dict(
        seq_len=ngram_slots(cfg.data.max_len or (600 if task == "imdb" else 25), cfg.data.ngrams),
        dim=vectors_dim(cfg.data.vectors) + cfg.data.extra_channels(vectors_dim(cfg.data.vectors)),
        hidden=tuple(m.hidden), attention=m.attention, mask_padding=m.mask_padding, pool_queries=m.pool_queries,
        bias_offset=m.bias_offset, init_gain=m.init_gain, schedule=m.schedule,
    )
    if m.gamma is not None:
        options["gamma"] = m.gamma
    if isinstance(getattr(m, "input_scale", None), float):
        options["input_scale"] = m.input_scale
    spec = replace(build_spec(task, **options), name=name)
    tol = cfg.ep.tol if cfg.ep.tol is not None else DEFAULT_TOL
    batches = DEFAULT_BATCHES.get(name, (cfg.train.batch_size,))
    return Shape(name, spec, cfg.ep.beta, cfg.ep.free_steps, cfg.ep.nudge_steps, tol, batches, tuple(cfg.train.lrs))


def random_batch(spec: GraphSpec, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g) * INPUT_RMS
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return x, y


def _preset_config(shape_name: str):
    """The preset a shape is built from (its data settings: where `--inputs real` reads)."""
    return load_preset(*shape_name.split("-"))


def real_data_available(shape_name: str) -> bool:
    """Whether `--inputs real` can run for this shape here (a preset shape whose task data is found)."""
    from analog_ep.data.sources import get_spec, locate_local_files, resolve_data_dir

    if shape_name in TEST_SHAPES:
        return False
    cfg = _preset_config(shape_name)
    data_dir = resolve_data_dir(cfg.data.data_dir)
    if data_dir is None:
        return False
    try:
        return bool(locate_local_files(get_spec(cfg.data.task), data_dir))
    except DataError:  # a missing or malformed layout: the loader says what is wrong, at `--inputs real`
        return False


def real_batch(shape: Shape, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of the task's training split, embedded as `seqep train` embeds it."""
    from analog_ep.train.trainer import batches, load_task_for, model_embedding

    if shape.name in TEST_SHAPES:
        raise ConfigError(f"shape {shape.name} has no real data (it is a test shape): use --inputs random")
    cfg = _preset_config(shape.name)
    data = load_task_for(cfg, progress=False)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:batch]
    x, y = next(batches(data.train, model_embedding(cfg, data), batch, "cpu", torch.float32, order,
                        features=cfg.data.pair_features))
    if tuple(x.shape[1:]) != (shape.spec.num_streams, shape.spec.seq_len, shape.spec.dim):
        raise ValueError(f"real {shape.name} batch has shape {tuple(x.shape)}, the bench shape expects "
                         f"(B, {shape.spec.num_streams}, {shape.spec.seq_len}, {shape.spec.dim})")
    return x, y


def bench_batch(shape: Shape, batch: int, inputs: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a bench job times: real (see `real_batch`) or random (`random_batch`); `inputs` resolved."""
    return real_batch(shape, batch, seed) if inputs == "real" else random_batch(shape.spec, batch, seed)


def resolve_inputs(inputs: str, shape_name: str) -> str:
    """"auto" → "real" where the shape's data is found, else "random"; "real" where it cannot run: an error."""
    if inputs not in INPUTS:
        raise ConfigError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if inputs == "auto":
        return "real" if real_data_available(shape_name) else "random"
    if inputs == "real" and not real_data_available(shape_name):
        why = ("it is a test shape" if shape_name in TEST_SHAPES
               else "its data was not found (set SEQEP_DATA_DIR to a folder laid out like ../shared/data)")
        raise ConfigError(f"--inputs real cannot run for {shape_name}: {why}; or use --inputs random")
    return inputs


def make_net(shape: Shape, reference: bool = False) -> EPNet:
    """The network every mode of a shape times: the shape's spec, seed 0 (the reference: synchronous updates)."""
    spec = replace(shape.spec, schedule="synchronous") if reference else shape.spec
    return EPNet(spec, seed=0)
