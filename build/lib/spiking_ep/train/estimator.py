"""The spiking trainer's estimators (spike-driven EP / C-EP, or the analog control) and its evaluation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from analog_ep.phi import EPNet
from analog_ep.train.inner_loop import param_lrs
from spiking_ep.convert import SpikingNet
from spiking_ep.evaluate import evaluate_spiking
from spiking_ep.learning import SpikingEstimate, spiking_cep, spiking_ep_symmetric
from spiking_ep.train.config import CONTROL_ESTIMATOR, SpikingTrainConfig
from spiking_ep.train.splits import Split

Estimator = Callable[[EPNet, torch.Tensor, torch.Tensor], SpikingEstimate]


def spiking_estimator(snet: SpikingNet, cfg: SpikingTrainConfig, optimizer: torch.optim.Optimizer) -> Estimator:
    """An `analog_ep.train.inner_loop.train_step` estimator: (net, x, y) → estimate with `.applied`.

    Symmetric EP sets `.grad` for the optimiser; C-EP moves the weights itself with the optimiser's
    current learning rates as its local step sizes (as the analog trainer does for `cep`). The control
    "analog_ep" is `analog_ep`'s symmetric EP (free phase `analog_steps`, nudge a quarter of it)."""
    ep = cfg.ep_config()
    if cfg.estimator == CONTROL_ESTIMATOR:
        from analog_ep.estimators import EPConfig, make_estimator

        return make_estimator("ep_symmetric", EPConfig(cfg.beta, cfg.analog_steps, max(cfg.analog_steps // 4, 1),
                                                       tol=1e-4))

    def estimate(net: EPNet, x: torch.Tensor, y: torch.Tensor) -> SpikingEstimate:
        spiking = snet if net is snet.net else dataclasses.replace(snet, net=net)
        if cfg.estimator == "spiking_cep":
            return spiking_cep(spiking, x, y, ep, param_lrs(optimizer, net))
        return spiking_ep_symmetric(spiking, x, y, ep)

    return estimate


def spiking_accuracy(snet: SpikingNet, split: Split, timesteps: Sequence[int], analog_steps: int) -> dict[str, Any]:
    """`evaluate_spiking` on a split, in order; the compact numbers a training log needs."""
    result = evaluate_spiking(snet, split.batches(None), timesteps, analog_steps=analog_steps)
    return {"analog_accuracy": result["analog"]["accuracy"], "samples": result["samples"],
            "accuracy": {T: v["accuracy"] for T, v in result["timesteps"].items()},
            "agreement": {T: v["agreement"] for T, v in result["timesteps"].items()},
            "spikes_per_sample": {T: v["spikes_per_sample"] for T, v in result["timesteps"].items()}}



def spikes_per_sample(est: Any) -> float:
    """Spikes of one training step per sample, free and nudged phases (0 for the analog control)."""
    record = getattr(est, "record", None)
    return sum(record.spikes_per_sample().values()) if record is not None else 0.0

