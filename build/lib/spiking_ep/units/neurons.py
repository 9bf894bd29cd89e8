"""Our rate-coding units: how a unit turns its target rate σ(u) ∈ [0, 1] into spikes (`base.Coding`).

The soma is linear (IF) or a coin (Bernoulli); the nonlinearity is the saturating input current σ(u):

- `IFCoding` (deterministic integrate-and-fire, reset by subtraction): v ← v + σ(u); spike when
  v ≥ 1; v ← v − 1. It is a first-order sigma-delta modulator of σ(u): over any window the count
  equals Σ σ(u_t) up to ±1 spike, and with a constant current the error never accumulates.
- `BernoulliCoding` (stochastic): spike with probability σ(u). Unbiased, error ~ 1/√T.
- `SigmaDeltaCoding` (O'Connor et al. 2019): a unit transmits *changes* of σ(u) as signed spikes of
  size θ; the receiver integrates them. The decoded value is within θ/2 of σ(u) at every step, and a
  unit whose state has settled stops spiking.

Example: an IF unit driven at σ(u) = 0.3 for 10 steps fires 3 times (v₀ = 0.5 rounds Σ σ(u)).

    >>> import torch
    >>> unit = IFCoding()
    >>> state, count = unit.init(torch.zeros(1)), 0.0
    >>> for _ in range(10):
    ...     spikes, state = unit.encode(torch.tensor([0.3]), state)
    ...     count += spikes.item()
    >>> count
    3.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spiking_ep.units.base import filter_trace, shared_uniform


# ---------------------------------------------------------------- integrate-and-fire
@dataclass
class IFState:
    v: torch.Tensor  # membrane potential, in units of the threshold


def if_step(current: torch.Tensor, state: IFState, threshold: float = 1.0) -> tuple[torch.Tensor, IFState]:
    """One step of a non-leaky integrate-and-fire unit with reset by subtraction.

    Subtracting the threshold (instead of resetting to 0) keeps the overshoot, so the spike count
    tracks the integrated current exactly up to one spike: count_T = ⌊v₀ + Σ current⌋ for currents
    in [0, threshold] (at most one spike per step: the current is σ(u) ≤ 1).
    """
    v = state.v + current
    spikes = (v >= threshold).to(current.dtype)
    return spikes, IFState(v - spikes * threshold)


@dataclass(frozen=True)
class IFCoding:
    """Deterministic IF rate coding. `v0` = 0.5 starts every membrane half-way: counts round Σ σ(u)."""

    v0: float = 0.5
    threshold: float = 1.0
    name: str = "if"
    signed: bool = False

    def init(self, like: torch.Tensor) -> IFState:
        return IFState(torch.full_like(like, self.v0))

    def encode(self, rate: torch.Tensor, state: IFState) -> tuple[torch.Tensor, IFState]:
        return if_step(rate * self.threshold, state, self.threshold)

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
        return filter_trace(trace, spikes, alpha)


# ---------------------------------------------------------------- Bernoulli
@dataclass
class BernoulliState:
    generator: torch.Generator
    repeat: int = 1  # > 1: the batch is `repeat` stacked copies that draw the same noise (see `stacked`)

    def stacked(self, other: BernoulliState) -> BernoulliState:
        """Two copies of one run as one batch, with common random numbers: the ±β nudged phases then
        differ only through the nudge, not through independent noise (variance reduction for EP)."""
        g = torch.Generator(device=self.generator.device)
        g.set_state(self.generator.get_state())
        return BernoulliState(g, self.repeat * 2)


def bernoulli_step(rate: torch.Tensor, generator: torch.Generator | None = None, repeat: int = 1) -> torch.Tensor:
    """Spike with probability `rate` (clamped to [0, 1]): E[spike] = σ(u) exactly."""
    return (shared_uniform(rate.shape, repeat, generator, rate) < rate).to(rate.dtype)


@dataclass(frozen=True)
class BernoulliCoding:
    """Stochastic rate coding. All layers of one run share one generator seeded with `seed`."""

    seed: int = 0
    name: str = "bernoulli"
    signed: bool = False

    def init(self, like: torch.Tensor) -> BernoulliState:
        return BernoulliState(torch.Generator(device=like.device).manual_seed(self.seed))

    def encode(self, rate: torch.Tensor, state: BernoulliState) -> tuple[torch.Tensor, BernoulliState]:
        return bernoulli_step(rate, state.generator, state.repeat), state

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
        return filter_trace(trace, spikes, alpha)


# ---------------------------------------------------------------- sigma-delta
@dataclass
class SigmaDeltaState:
    sent: torch.Tensor  # the value the receivers have reconstructed so far (Σ spikes·θ)


def sigma_delta_step(
    value: torch.Tensor, state: SigmaDeltaState, threshold: float, max_spikes: int | None = None
) -> tuple[torch.Tensor, SigmaDeltaState]:
    """Signed spike count n = round((value − sent)/θ): the receivers' copy moves by nθ.

    The error value − sent stays within θ/2 (or is slew-limited by `max_spikes` per step). A unit
    whose value does not change sends nothing: cost follows activity changes, not activity.
    """
    n = torch.round((value - state.sent) / threshold)
    if max_spikes is not None:
        n = n.clamp(-max_spikes, max_spikes)
    return n, SigmaDeltaState(state.sent + n * threshold)


@dataclass(frozen=True)
class SigmaDeltaCoding:
    """Sigma-delta coding with quantum θ = `threshold` (signed spikes, receivers integrate them)."""

    threshold: float = 1.0 / 32
    max_spikes: int | None = None
    name: str = "sigma_delta"
    signed: bool = True

    def init(self, like: torch.Tensor) -> SigmaDeltaState:
        return SigmaDeltaState(torch.zeros_like(like))

    def encode(self, rate: torch.Tensor, state: SigmaDeltaState) -> tuple[torch.Tensor, SigmaDeltaState]:
        return sigma_delta_step(rate, state, self.threshold, self.max_spikes)

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
        """The receiver integrates the signed spikes: no filter, so `alpha` is unused."""
        return trace + spikes * self.threshold
