"""What every unit model provides (the `Coding` protocol) and the helpers that codings and the dynamics share.

Norse-style functional core: a coding is a small object with three pure methods on tensors

    state          = coding.init(like)                       # per-unit neuron state (a small record)
    spikes, state  = coding.encode(rate, state)              # one timestep
    trace          = coding.decode(trace, spikes, alpha)     # the synaptic trace a neighbour reads

`rate` is what the analog unit would output, σ(∂Φ/∂s) (computed by `EPNet.update_layer`), so the
nonlinearity is the saturating *input current* of the unit. A receiver's trace for binary spikes is an
exponential filter r ← r + α(s − r) (a first-order synapse); `trace_alpha` gives the schedule
α_t = max(1/(t+1), 1/τ): a running mean while t < τ (no start-up bias from r = 0), an exponential
filter with time constant τ afterwards.

Example:
    >>> trace_alpha(0, 16.0), trace_alpha(3, 16.0), trace_alpha(100, 16.0)
    (1.0, 0.25, 0.0625)
    >>> import torch
    >>> filter_trace(torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.0]), 0.25)
    tensor([0.2500, 0.3750])
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Coding(Protocol):
    """What the spiking dynamics need from a unit model (our units and library adapters alike)."""

    name: str
    signed: bool  # spikes can be negative (sigma-delta): cost counts |spikes|

    def init(self, like: torch.Tensor) -> Any: ...

    def encode(self, rate: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor: ...


def trace_alpha(t: int, tau: float | None) -> float:
    """Filter gain at step t (0-based) since the trace started: running mean, then time constant τ.

    τ = None keeps the running mean forever (rates converge as 1/T, but the trace never forgets).
    """
    mean = 1.0 / (t + 1)
    return mean if tau is None else max(mean, 1.0 / tau)


def filter_trace(trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
    """First-order synaptic filter: every spike adds α to the trace, which relaxes towards 0 by (1 − α)."""
    return trace + alpha * (spikes - trace)


def shared_uniform(
    shape: torch.Size, repeat: int, generator: torch.Generator | None, like: torch.Tensor
) -> torch.Tensor:
    """Uniform noise of `shape` whose `repeat` batch blocks are identical (common random numbers for the
    stacked ±β phases; the Bernoulli units and the sampled attention winner draw from it)."""
    if repeat == 1:
        return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    block = torch.rand((shape[0] // repeat, *shape[1:]), generator=generator, dtype=like.dtype, device=like.device)
    return block.repeat(repeat, *([1] * (len(shape) - 1)))
