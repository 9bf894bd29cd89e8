"""`seqep bench --accuracy`: the exact and the fast path train the same model; their validation accuracy."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from analog_ep.bench.shapes import build_shape
from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, make_estimator
from analog_ep.fast.precision import OPT_INS, resolve_precision
from analog_ep.phi import enable_compiled_kernels
from analog_ep.train.config import load_preset
from analog_ep.train.inner_loop import train_step


def fast_mode(name: str, precision: str = "auto") -> tuple[str, str]:
    """The fast path's mode for shape `name` here (`resolve_precision`: a trap is refused); a ConfigError where
    the request resolves to the exact path, which would be compared with itself."""
    mode, reason = resolve_precision(precision, build_shape(name).spec)
    if mode == "fp32":
        raise ConfigError(f"--accuracy compares the exact path with a fast mode, but precision {precision} is the "
                          f"exact path here ({reason}); name a fast mode with --precision (bf16, int8 or their "
                          f"opt-ins {', '.join(OPT_INS)})")
    return mode, reason


def compare_training(name: str, train_limit: int | None, epochs: int, data_dir: str | None = None,
                     tol: float | None = None, log=None, compile_kernels: bool = True, precision: str = "auto"
                     ) -> dict:
    """Train the same CPU-preset model twice, same seed and batches: exact path vs the fast path in the mode
    `precision` resolves to on this machine (`fast_mode`).

    Real data (needs the data directory). Constant learning rates (the preset's, no schedule), the preset's
    free-phase tolerance for both (`tol` overrides it; the nudged phases run all K steps); both models are
    evaluated on the validation split by the same exact fp32 free phase.
    """
    from analog_ep.train.trainer import (
        batches,
        build_model,
        evaluate_split,
        load_task_for,
        make_optimizer,
        model_embedding,
        seed_everything,
    )

    fast, reason = fast_mode(name, precision)
    if compile_kernels:
        enable_compiled_kernels(True)
    task_name, preset = name.split("-")
    cfg = load_preset(task_name, preset)
    cfg.data.train_limit = train_limit
    cfg.data.data_dir = data_dir or os.environ.get("SEQEP_DATA_DIR") or cfg.data.data_dir
    cfg.train.epochs = epochs
    data = load_task_for(cfg, progress=False)
    embedding = model_embedding(cfg, data)
    out: dict[str, Any] = {"shape": name, "n_train": len(data.train), "n_val": len(data.val), "epochs": epochs,
                           "tol": tol if tol is not None else cfg.ep.tol, "fast": fast, "precision_reason": reason}
    predictions: dict[str, torch.Tensor] = {}
    for precision in ("fp32", fast):
        seed_everything(cfg.train.seed)
        net = build_model(cfg, data)
        opt = make_optimizer(cfg, net)
        estimator = make_estimator("ep_symmetric", EPConfig(cfg.ep.beta, cfg.ep.free_steps, cfg.ep.nudge_steps,
                                                            tol=out["tol"], precision=precision))
        t0, steps = time.perf_counter(), []
        for epoch in range(epochs):
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
            for x, y in batches(data.train, embedding, cfg.train.batch_size, "cpu", torch.float32, order,
                                features=cfg.data.pair_features):
                steps.append(train_step(net, estimator, x, y, opt).free_trace.steps)
        seconds = time.perf_counter() - t0
        val = evaluate_split(net, data.val, embedding, cfg)
        out[precision] = {"val_accuracy": val["accuracy"], "train_seconds": seconds,
                          "mean_free_steps": sum(steps) / max(len(steps), 1)}
        predictions[precision] = val["predictions"]
        if log:
            log(f"{name} {precision}: val accuracy {val['accuracy']:.4f}, {seconds:.0f} s training")
    out["prediction_agreement"] = float((predictions["fp32"] == predictions[fast]).float().mean())
    return out
