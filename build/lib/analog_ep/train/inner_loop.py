"""The inner loop every trainer shares: layer-wise optimiser, one EP step, accuracy by free phase."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import torch

from analog_ep.dynamics import free_phase
from analog_ep.estimators import Estimate, Estimator
from analog_ep.phi import EPNet


def layer_param_groups(net: EPNet, lrs: Sequence[float] | float, weight_decay: float = 0.0,
                       embedding_lr: float | None = None) -> list[dict]:
    """One optimiser group per layer (the paper's layer-wise learning rates: proj, fc1, …, out), and one for
    learned word vectors (`embedding_lr`).

    `lrs` has one entry per layer in `net.spec.layer_names` order, or is a single float for all.
    """
    names = net.spec.layer_names
    if isinstance(lrs, (int, float)):
        lrs = [float(lrs)] * len(names)
    if len(lrs) != len(names):
        raise ValueError(f"need {len(names)} learning rates (one per layer {names}), got {len(lrs)}")
    layer_of = net.param_layer
    groups = []
    for layer, lr in zip(names, lrs):
        params = [p for n, p in net.named_parameters() if layer_of[n] == layer]
        groups.append({"params": params, "lr": float(lr), "weight_decay": weight_decay, "layer": layer})
    if net.embedding is not None:  # learned word vectors: their own rate (default the first layer's), no decay
        groups.append({"params": [net.embedding], "lr": float(lrs[0] if embedding_lr is None else embedding_lr),
                       "weight_decay": 0.0, "layer": "embedding"})
    return groups


def param_lrs(optimizer: torch.optim.Optimizer, net: EPNet) -> dict[str, float]:
    """Current learning rate per parameter name (C-EP's local step sizes follow the schedule)."""
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in net.named_parameters()}


def train_step(net: EPNet, estimator: Estimator, x: torch.Tensor, y: torch.Tensor,
               optimizer: torch.optim.Optimizer, before_step: Callable[[], None] | None = None) -> Estimate:
    """One batch: estimate the gradient, then step (unless the estimator already moved the weights).
    `before_step` runs between the two (data parallelism averages the ranks' gradients there).

    The returned estimate no longer holds the gradients (`grads` is empty): they are spent, and a caller
    keeping the estimate until the next batch would otherwise keep a second set of them alive while that
    batch computes its own (at the paper's SNLI shape, 48 MB of FC-1 gradient)."""
    optimizer.zero_grad(set_to_none=True)
    est = estimator(net, x, y)
    if not est.applied:
        if before_step is not None:
            before_step()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return replace(est, grads={})


@torch.no_grad()
def accuracy(net: EPNet, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], free_steps: int,
             tol: float | None = None) -> float:
    """Fraction of correct argmax predictions at the free fixed point over (x, y) batches."""
    correct = total = 0
    for x, y in batches:
        state, _ = free_phase(net, net.prepare(x), free_steps, tol=tol, track=False)
        correct += int((state[-1].argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / max(total, 1)
