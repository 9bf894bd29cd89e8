"""Unit activations. States live in [0, 1] so they read directly as firing rates (spiking backend)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def hard_sigmoid(u: torch.Tensor) -> torch.Tensor:
    """σ(u) = (1 + hardtanh(u − 1)) / 2 = clamp(u/2, 0, 1), the reference code's `my_hard_sig`."""
    return (u * 0.5).clamp(0.0, 1.0)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"hard_sigmoid": hard_sigmoid}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None
