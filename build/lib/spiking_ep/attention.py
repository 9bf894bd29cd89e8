"""Hopfield attention in spiking form: a winner-take-all that picks one stored token per query row and step.

The analog projection layer sets each row to the retrieval softmax(γ q_t Kᵀ) K (Ramsauer et al. 2020).
Here each row t owns a *pointer population* of Lk units, one per stored token (key). At every step
exactly one of them fires, the winner j_t, with frequency softmax(γ q_t Kᵀ)_j; the row then transmits
the winner's token vector K_{j_t}. Its time average (the trace the next layer reads) is therefore the
analog retrieval Σ_j p_j K_j, and that is all the rest of the network needs.

Two winner rules, the attention counterparts of the two rate codings:
- "sample": j_t ~ Categorical(p_t) (stochastic WTA; unbiased, error ~ 1/√T, like Bernoulli units);
- "herd": deterministic herding: credit_j += p_j, winner = argmax credit, credit_winner −= 1. The count
  of each winner tracks Σ_t p_{t,j} within a bounded error (the multi-class IF neuron).
- "dense" (ablation, not spiking): transmit the analog retrieval itself.
- "event" (event-driven attention, an energy lever): no pointer units. A sample's rows recompute the
  query, scores, softmax and retrieval softmax(γ q Kᵀ) K only when the first FC layer's trace has drifted
  by at least `drift` (L1) since the last recompute, and hold the retrieval otherwise: a settled
  attention sends nothing. The query's top-down part W₁ᵀh¹ is then computed densely at each event instead
  of by every fc1 spike, and the value path W₁ flat(s¹) changes only at events. With drift = 0 every step
  is an event and the rows are the exact retrieval of the current query (the reference it is tested on).

What is spike-driven and what is not (the energy report must count the dense parts as MACs):
- spike-driven: the top-down part of the query, W₁ᵀh¹ (every spike of the first FC layer adds one
  column of W₁ to the query current; counted as synaptic ops of that layer), and the winner events.
- dense MACs per step and projection: the scores q_t·K_j (Lq·Lk·d), the softmax (Lq·Lk exps), and the
  value path into the first FC layer: each row sends a real d-vector K_{j_t}, so W₁ flat(s¹) costs
  Lq·d·n₁ MACs, exactly as in the analog network (the winner only selects which vector).
- dense once per sample: the input current X W₀ᵀ of the projection synapse (L·d·d MACs), see dynamics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analog_ep.hopfield import hopfield_weights
from spiking_ep.units.base import shared_uniform

ATTENTION_MODES = ("herd", "sample", "dense", "event")
DEFAULT_DRIFT = 2.0  # "event": L1 drift of fc1's trace that triggers a recompute (docs/energy.md §5)


attention_weights = hopfield_weights  # the analog layer's softmax weights, shared (one definition)


def sample_winners(weights: torch.Tensor, generator: torch.Generator | None = None, repeat: int = 1) -> torch.Tensor:
    """One key index per row drawn from `weights` (rows sum to 1, or to 0 for empty rows).

    `repeat` > 1: the batch is stacked copies of one run that share their random numbers.
    """
    cdf = weights.cumsum(-1)
    u = shared_uniform(weights.shape[:-1] + (1,), repeat, generator, weights)
    u = u * cdf[..., -1:]  # empty rows: u = 0 → index 0, zeroed by the caller
    return torch.searchsorted(cdf.contiguous(), u.contiguous()).clamp_max(weights.shape[-1] - 1).squeeze(-1)


def herd_winners(weights: torch.Tensor, credit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic WTA: every key earns its probability, the richest fires and pays 1."""
    credit = credit + weights
    winners = credit.argmax(-1)
    credit = credit - torch.nn.functional.one_hot(winners, weights.shape[-1]).to(credit.dtype)
    return winners, credit


@dataclass
class WTAState:
    credit: torch.Tensor | None  # herding credit per (row, key); None for "sample" / "dense"
    generator: torch.Generator | None
    repeat: int = 1  # stacked copies sharing random numbers (see `BernoulliState.stacked`)

    def stacked(self, other: WTAState) -> WTAState:
        credit = None if self.credit is None else torch.cat([self.credit, other.credit])
        if self.generator is None:
            return WTAState(credit, None, self.repeat)
        g = torch.Generator(device=self.generator.device)
        g.set_state(self.generator.get_state())
        return WTAState(credit, g, self.repeat * 2)


@dataclass
class EventState:
    """Event-driven attention: the rows each sample holds, and the fc1 trace they were computed from."""

    retrieval: torch.Tensor | None  # None before the first step: every sample's first step is an event
    source: torch.Tensor | None  # (batch, n₁) trace of the first FC layer at the last recompute


@dataclass(frozen=True)
class SpikingAttention:
    """The projection layer's spiking retrieval. `step` returns the transmitted rows and the winner count."""

    mode: str = "herd"
    seed: int = 0
    drift: float = DEFAULT_DRIFT  # "event" only: see the module docstring

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"attention mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.drift < 0:
            raise ValueError(f"the event threshold drift must be ≥ 0, got {self.drift}")

    @property
    def holds_rows(self) -> bool:
        """The rows are the retrieval itself, held between events: the trace is set, not filtered."""
        return self.mode == "event"

    def init(self, query: torch.Tensor, keys: torch.Tensor) -> WTAState | EventState:
        if self.mode == "event":
            return EventState(None, None)
        shape = query.shape[:-1] + (keys.shape[-2],)
        credit = torch.zeros(shape, dtype=query.dtype, device=query.device) if self.mode == "herd" else None
        gen = torch.Generator(device=query.device).manual_seed(self.seed) if self.mode == "sample" else None
        return WTAState(credit, gen)

    def step(
        self, query: torch.Tensor, keys: torch.Tensor, gamma: float, key_mask: torch.Tensor | None,
        state: WTAState | EventState, source: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int, WTAState | EventState]:
        """(rows sent (..., Lq, d), number of winner spikes, new state) for one timestep.

        "event": `source` is the first FC layer's trace; the rows are the held retrieval and the count is
        the number of samples that recomputed it.
        """
        if self.mode == "event":
            if source is None:
                raise ValueError("event-driven attention needs the first FC layer's trace (source)")
            return event_step(query, keys, gamma, key_mask, state, source, self.drift)
        weights = attention_weights(query, keys, gamma, key_mask)
        if self.mode == "dense":
            return torch.matmul(weights, keys), 0, state
        if self.mode == "herd":
            winners, credit = herd_winners(weights, state.credit)
            state = WTAState(credit, None, state.repeat)
        else:
            winners = sample_winners(weights, state.generator, state.repeat)
        live = weights.sum(-1, keepdim=True) > 0  # rows with at least one real key
        sent = torch.take_along_dim(keys, winners.unsqueeze(-1), dim=-2) * live.to(keys.dtype)
        return sent, int(live.sum()), state


def event_step(query: torch.Tensor, keys: torch.Tensor, gamma: float, key_mask: torch.Tensor | None,
               state: EventState, source: torch.Tensor, drift: float) -> tuple[torch.Tensor, int, EventState]:
    """Recompute the retrieval of the samples whose source trace moved by ≥ `drift` (L1); hold the rest."""
    flat = source.reshape(source.shape[0], -1)
    if state.source is None or state.retrieval is None:
        fire = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    else:
        fire = (flat - state.source).abs().sum(-1) >= drift
    if not bool(fire.any()):
        return state.retrieval, 0, state
    fresh = torch.matmul(attention_weights(query, keys, gamma, key_mask), keys)
    if state.retrieval is None or state.source is None:
        return fresh, int(fire.sum()), EventState(fresh, flat.clone())
    rows = fire.view(-1, *([1] * (fresh.dim() - 1)))
    retrieval = torch.where(rows, fresh, state.retrieval)
    return retrieval, int(fire.sum()), EventState(retrieval, torch.where(fire[:, None], flat, state.source))
