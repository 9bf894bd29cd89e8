"""The same spiking network with library neurons: snntorch `Leaky` and norse `LIFCell`, as `Coding`s.

Each adapter feeds the unit's target rate σ(u) as the input current of one library neuron per unit
and decodes its binary spikes with the same synaptic trace as the native units, so the network, the
Φ graph and the readout are unchanged: only the soma differs. Where they agree with the native
integrate-and-fire units (`neurons.IFCoding`) and where they do not, and why (tests in
tests/spiking/test_spiking_adapters.py):

- snntorch `Leaky(beta=1, threshold=1, reset_mechanism="subtract")` *is* the native IF unit: same
  rates (count = Σ σ(u) ± 1). Spike trains are identical to `IFCoding(v0=0)` except at exact ties
  v = 1: snntorch fires on mem > threshold (strict) where the native unit fires on v ≥ 1, so a unit at
  σ(u) = 1 loses its first spike. (snntorch applies the subtraction one step late, `reset_delay=True`,
  which does not change the count.)
- snntorch with beta < 1 (leak): rate < σ(u), and zero below the rheobase σ(u) ≤ (1 − beta)·threshold:
  the f-I curve is no longer the identity, so the network no longer runs Φ's dynamics exactly.
- snntorch `reset_mechanism="zero"`: the overshoot is lost at each spike; a constant σ(u) = p gives
  rate 1/(⌊1/p⌋ + 1) instead of p (e.g. 0.4 → 1/3).
- norse `LIFCell` integrates dv = dt·τ_mem⁻¹(v_leak − v + i) with a synaptic current i, and resets to
  `v_reset` (reset to zero). With `dt·τ_syn⁻¹ = 1` the current is the input of the step, and the adapter
  scales σ(u) by 1/(dt·τ_mem⁻¹) so that, without leak, one step adds σ(u) to v. What remains is the
  leak (v decays by dt·τ_mem⁻¹ per step) and the reset to zero: rate 1/k with k the first step at
  which (p/a)(1 − (1 − a)^k) > v_th, a = dt·τ_mem⁻¹; as a → 0 this is reset-to-zero IF, 1/(⌊1/p⌋+1).
  dt only enters through dt·τ⁻¹: norse's default (dt = 1 ms, τ_mem = 10 ms) is a 10 %-per-step leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from spiking_ep.units.base import filter_trace


@dataclass
class SnntorchState:
    mem: torch.Tensor


@dataclass(frozen=True)
class SnntorchLeakyCoding:
    """snntorch `Leaky` units driven by σ(u)·threshold. beta = 1, "subtract": the native IF unit."""

    beta: float = 1.0
    threshold: float = 1.0
    reset_mechanism: str = "subtract"
    name: str = "snntorch"
    signed: bool = False
    _neuron: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        import snntorch

        neuron = snntorch.Leaky(beta=self.beta, threshold=self.threshold, reset_mechanism=self.reset_mechanism)
        object.__setattr__(self, "_neuron", neuron)

    def init(self, like: torch.Tensor) -> SnntorchState:
        return SnntorchState(torch.zeros_like(like))  # snntorch's own initial membrane (init_leaky)

    def encode(self, rate: torch.Tensor, state: SnntorchState) -> tuple[torch.Tensor, SnntorchState]:
        spikes, mem = self._neuron(rate * self.threshold, state.mem)
        return spikes.to(rate.dtype), SnntorchState(mem)

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
        return filter_trace(trace, spikes, alpha)


@dataclass(frozen=True)
class NorseLIFCoding:
    """norse `LIFCell` units. `leak` = dt·τ_mem⁻¹ (fraction of v lost per step); dt·τ_syn⁻¹ = 1 so the
    synaptic current is the step's input; σ(u) is scaled by 1/leak so one leak-free step adds σ(u) to v."""

    leak: float = 0.01
    dt: float = 1e-3
    v_th: float = 1.0
    name: str = "norse"
    signed: bool = False
    _cell: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.leak <= 1:
            raise ValueError(f"leak = dt/τ_mem must be in (0, 1], got {self.leak}")
        from norse.torch import LIFCell, LIFParameters

        p = LIFParameters(tau_syn_inv=torch.as_tensor(1.0 / self.dt), tau_mem_inv=torch.as_tensor(self.leak / self.dt),
                          v_leak=torch.as_tensor(0.0), v_th=torch.as_tensor(self.v_th), v_reset=torch.as_tensor(0.0))
        object.__setattr__(self, "_cell", LIFCell(p, dt=self.dt))

    def init(self, like: torch.Tensor) -> Any:
        from norse.torch.functional.lif import LIFFeedForwardState

        return LIFFeedForwardState(v=torch.zeros_like(like), i=torch.zeros_like(like))

    def encode(self, rate: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        spikes, state = self._cell(rate / self.leak, state)
        return spikes.to(rate.dtype), state

    def decode(self, trace: torch.Tensor, spikes: torch.Tensor, alpha: float) -> torch.Tensor:
        return filter_trace(trace, spikes, alpha)
