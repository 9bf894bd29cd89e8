"""Spiking free and nudged phases, driven by the shared Φ of `analog_ep` (nothing re-declared here).

At every timestep, for each layer n (in the order of `net.spec.schedule`: all at once, or even layers
then odd layers, as `EPNet.step`):

    u^n   = EPNet.layer_drive(inputs, traces, n)           ∂Φ/∂sⁿ with the neighbours' *traces* as states
    p^n   = EPNet.update_layer(inputs, traces, n, u^n, β, y) the analog unit's output σ(u + β(y − s)):
                                                           the unit's target rate
    spikes, unit = coding.encode(p^n, unit)                IF / Bernoulli / sigma-delta / adapters
    traces[n]    = coding.decode(traces[n], spikes, α_t)   what the synapses of layer n deliver

Why `layer_drive` on traces is the event-driven synapse: the synaptic current of a unit is a linear
filter of its input spikes, Σ_j W_ij (f * s_j)(t) = Σ_j W_ij r_j(t), so "every spike adds a weight column
to the current, the current is filtered" and "the drive of the filtered spike trains" are the same
number (`test_event_driven_current_equals_layer_drive_of_traces`). Top-down drive goes through Wᵀ the same way.
The projection layer (Hopfield attention) is run by `spiking_ep.attention` with the query
`layer_drive(inputs, traces, 0)`.

Inputs enter as a constant current: word vectors are real and signed, so instead of signed spike
channels the projection synapse computes X W₀ᵀ once per sample (`EPNet.prepare`, dense MACs
P·L·d·d); for a plain MLP the first layer's input current W₀x is likewise computed once (n₁·S·L·d MACs).
The simulation recomputes nothing it does not need to, but `SpikeRecord` counts what hardware would do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from analog_ep.phi import Inputs, State
from spiking_ep.units.base import filter_trace, trace_alpha

if TYPE_CHECKING:
    from spiking_ep.convert import SpikingNet


# ---------------------------------------------------------------- state
@dataclass
class SpikingState:
    """Everything that evolves during a spiking run."""

    traces: State  # per layer, the decoded value the synapses deliver: same shapes as analog states
    units: list[Any]  # per layer, the neuron state of the coding (WTA state for the attention layer)
    t: int = 0  # steps since the run started: the trace filter's schedule α_t

    def clone(self) -> SpikingState:
        """An independent copy (the ±β nudged phases both start from the free phase's end)."""
        return SpikingState([tr.clone() for tr in self.traces], [_clone(u) for u in self.units], self.t)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, torch.Generator):
        g = torch.Generator(device=obj.device)
        g.set_state(obj.get_state())
        return g
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: _clone(getattr(obj, k)) for k in obj.__dataclass_fields__})
    if isinstance(obj, tuple):  # named tuples of library adapters
        return type(obj)(*(_clone(v) for v in obj)) if hasattr(obj, "_fields") else tuple(_clone(v) for v in obj)
    return obj


def _stack(a: Any, b: Any) -> Any:
    """Concatenate two states along the batch; states with a `stacked` method decide themselves."""
    if hasattr(a, "stacked"):
        return a.stacked(b)
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, torch.Generator):
        return _clone(a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a)(**{k: _stack(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__})
    if isinstance(a, tuple) and hasattr(a, "_fields"):
        return type(a)(*(_stack(x, y) for x, y in zip(a, b)))
    return a


def stack_spiking(a: SpikingState, b: SpikingState) -> SpikingState:
    """Two runs as one batch (the +β and −β phases are run together, as in analog symmetric EP)."""
    return SpikingState([_stack(x, y) for x, y in zip(a.traces, b.traces)],
                        [_stack(x, y) for x, y in zip(a.units, b.units)], a.t)


def init_state(snet: SpikingNet, inputs: Inputs) -> SpikingState:
    """Silent network: zero traces, fresh neurons (IF membranes at v₀)."""
    net = snet.net
    traces = net.zero_state(inputs.batch_size)
    units: list[Any] = []
    for n, tr in enumerate(traces):
        if snet.is_attention_layer(n):
            units.append(snet.attention.init(tr, inputs.keys))
        else:
            units.append(snet.coding.init(tr))
    return SpikingState(traces, units, 0)


# ---------------------------------------------------------------- cost record
@dataclass
class PhaseRecord:
    """Spikes of one phase: `spikes[t, n]` = |spikes| emitted by layer n at step t, summed over the batch."""

    spikes: list[list[float]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.spikes)

    def layer_totals(self) -> torch.Tensor:
        return torch.tensor(self.spikes, dtype=torch.float64).sum(0) if self.spikes else torch.zeros(0)


@dataclass
class SpikeRecord:
    """Event and operation counts of a spiking run, per phase, for the energy accounting.

    Per-step constants come from the spec; `phases` holds what was measured. Conventions:
    - a spike of layer n costs `fan_out[n]` synaptic operations (accumulates, ACs): bottom-up into
      layer n+1 and top-down into layer n−1 (sigma-delta spikes are signed; |spikes| are counted);
    - the attention layer's winner events are spikes of its pointer units, but the vector each row
      sends is real-valued, so its effect on the next layer is `dense_macs_per_step["attention_values"]`
      MACs per sample and step, plus the scores `["attention_scores"]` (and `softmax_exps`);
    - `dense_macs_per_sample["input_current"]`: the constant input current, computed once per sample;
    - `neuron_updates_per_step[n]`: units of layer n updated each step (pointer units for attention);
    - event-driven attention (mode "event"): no per-step attention MACs and no pointer units; each event
      (a sample recomputing its rows) costs `dense_macs_per_event` (top-down query, scores, retrieval,
      value path) and `exps_per_event`; the drift detector reads the n₁ fc1 traces every step.
    """

    layer_names: list[str]
    layer_units: list[int]
    fan_out: list[int]
    neuron_updates_per_step: list[int]
    dense_macs_per_step: dict[str, int]
    dense_macs_per_sample: dict[str, int]
    softmax_exps_per_step: int
    samples: int = 0
    phases: dict[str, PhaseRecord] = field(default_factory=dict)
    dense_macs_per_event: dict[str, int] = field(default_factory=dict)
    exps_per_event: int = 0

    def add(self, phase: str, spikes: list[float]) -> None:
        self.phases.setdefault(phase, PhaseRecord()).spikes.append(spikes)

    def steps(self, phase: str) -> int:
        return self.phases[phase].steps if phase in self.phases else 0

    def spikes_per_sample(self, phase: str | None = None) -> dict[str, float]:
        """Spikes per sample and layer, over one phase or all phases."""
        names = [phase] if phase else list(self.phases)
        total = torch.zeros(len(self.layer_names), dtype=torch.float64)
        for p in names:
            if p in self.phases and self.phases[p].steps:
                total += self.phases[p].layer_totals()
        return {n: float(v) / max(self.samples, 1) for n, v in zip(self.layer_names, total)}

    def firing_rates(self, phase: str) -> dict[str, float]:
        """Mean spikes per unit and step (for attention rows: winner events per row and step, ≤ 1)."""
        per_sample = self.spikes_per_sample(phase)
        steps = max(self.steps(phase), 1)
        return {n: per_sample[n] / (u * steps) for n, u in zip(self.layer_names, self.layer_units)}

    def synaptic_ops_per_sample(self, phase: str | None = None) -> float:
        per_sample = self.spikes_per_sample(phase)
        return float(sum(per_sample[n] * f for n, f in zip(self.layer_names, self.fan_out)))

    def dense_macs(self, phase: str | None = None) -> float:
        """Dense MACs per sample: per-step parts times steps, per-event parts times events (event-driven
        attention: the attention layer's count), plus the once-per-sample input current."""
        steps = sum(self.steps(p) for p in ([phase] if phase else self.phases))
        events = self.spikes_per_sample(phase)[self.layer_names[0]] if self.dense_macs_per_event else 0.0
        return self.dense_macs_for(steps, events)

    def dense_macs_for(self, steps: int, events: float) -> float:
        """Dense MACs per sample of a run of `steps` steps with `events` attention events per sample."""
        return float(sum(self.dense_macs_per_step.values()) * steps + sum(self.dense_macs_per_event.values()) * events
                     + sum(self.dense_macs_per_sample.values()))

    def to_dict(self) -> dict:
        return {
            "layer_names": self.layer_names,
            "layer_units": self.layer_units,
            "fan_out": self.fan_out,
            "neuron_updates_per_step": self.neuron_updates_per_step,
            "dense_macs_per_step": self.dense_macs_per_step,
            "dense_macs_per_sample": self.dense_macs_per_sample,
            "softmax_exps_per_step": self.softmax_exps_per_step,
            "dense_macs_per_event": self.dense_macs_per_event,
            "exps_per_event": self.exps_per_event,
            "samples": self.samples,
            "steps": {p: r.steps for p, r in self.phases.items()},
            "spikes_per_sample": {p: self.spikes_per_sample(p) for p in self.phases},
            "synaptic_ops_per_sample": {p: self.synaptic_ops_per_sample(p) for p in self.phases},
            "dense_macs_per_sample_total": {p: self.dense_macs(p) for p in self.phases},
        }


def new_record(snet: SpikingNet, samples: int) -> SpikeRecord:
    """The per-step cost constants of this network, read off its spec."""
    spec = snet.net.spec
    P = spec.num_projections
    sizes: list[int] = ([P * spec.proj_len * spec.dim] if P else []) + list(spec.layers)
    names = spec.layer_names
    fan_out, units, updates = [], [], []
    macs_step = {"attention_scores": 0, "attention_values": 0}
    macs_sample = {"input_current": 0}
    macs_event: dict[str, int] = {}
    exps = exps_event = 0
    events = snet.attention.holds_rows
    for n, size in enumerate(sizes):
        up = sizes[n + 1] if n + 1 < len(sizes) else 0
        # with event-driven attention the top-down query is computed densely at events, not by fc1's spikes
        down = sizes[n - 1] if n > 0 and not (events and snet.is_attention_layer(n - 1)) else 0
        if snet.is_attention_layer(n) and events:
            rows, keys = P * spec.proj_len, spec.seq_len
            units.append(1)  # one event unit per sample: all its rows recompute together
            updates.append(sizes[1])  # the drift detector reads every fc1 trace, every step
            fan_out.append(0)
            macs_event = {"query": sizes[1] * rows * spec.dim, "scores": rows * keys * spec.dim,
                          "retrieval": rows * keys * spec.dim, "values": rows * spec.dim * sizes[1]}
            exps_event = rows * keys
        elif snet.is_attention_layer(n):
            rows, keys = P * spec.proj_len, spec.seq_len
            units.append(rows)
            updates.append(rows * keys)
            fan_out.append(0)  # the rows send real vectors: counted below as MACs
            macs_step["attention_scores"] = rows * keys * spec.dim
            macs_step["attention_values"] = rows * spec.dim * sizes[1]
            exps = rows * keys
        else:
            units.append(size)
            updates.append(size)
            fan_out.append(up + down)
    if P and snet.net.proj_weight is not None:
        macs_sample["input_current"] = P * spec.seq_len * spec.dim * spec.dim
    elif not P:
        macs_sample["input_current"] = spec.fc_input_size * spec.layers[0]
    return SpikeRecord(names, units, fan_out, updates, macs_step, macs_sample, exps, samples,
                       dense_macs_per_event=macs_event, exps_per_event=exps_event)


# ---------------------------------------------------------------- one timestep
def update_groups(snet: SpikingNet, num_layers: int) -> list[list[int]]:
    """Layers updated together: all (synchronous) or even then odd (alternating), as `EPNet.step`."""
    if snet.net.spec.schedule == "synchronous":
        return [list(range(num_layers))]
    return [list(range(0, num_layers, 2)), list(range(1, num_layers, 2))]


StepHook = Callable[[SpikingState, SpikingState, list[torch.Tensor]], None]


def spiking_step(
    snet: SpikingNet,
    inputs: Inputs,
    state: SpikingState,
    beta: float | torch.Tensor = 0.0,
    target: torch.Tensor | None = None,
) -> tuple[SpikingState, list[torch.Tensor], list[float]]:
    """One timestep of every layer: (new state, per-layer spikes, per-layer |spike| totals).

    For the attention layer the "spikes" returned are the rows it sent (the winners' token vectors)
    and the total is the number of winner events.
    """
    net, coding = snet.net, snet.coding
    traces, units = list(state.traces), list(state.units)
    spikes: list[torch.Tensor] = [torch.empty(0)] * len(traces)
    counts = [0.0] * len(traces)
    alpha = trace_alpha(state.t, snet.tau)
    for group in update_groups(snet, len(traces)):
        drives = {n: net.layer_drive(inputs, traces, n) for n in group}
        for n in group:
            if snet.is_attention_layer(n):
                sent, events, units[n] = snet.attention.step(
                    drives[n], inputs.keys, net.spec.hopfield_gamma, inputs.key_mask, units[n], traces[n + 1])
                spikes[n], counts[n] = sent, float(events)
                traces[n] = sent if snet.attention.holds_rows else filter_trace(traces[n], sent, alpha)
                continue
            rate = net.update_layer(inputs, traces, n, drives[n], beta, target)
            spikes[n], units[n] = coding.encode(rate, units[n])
            counts[n] = float(spikes[n].abs().sum())
        for n in group:  # a group's traces change together, after all its units fired
            if not snet.is_attention_layer(n):
                traces[n] = coding.decode(traces[n], spikes[n], alpha)
    return SpikingState(traces, units, state.t + 1), spikes, counts


# ---------------------------------------------------------------- phases
@torch.no_grad()
def run_phase(
    snet: SpikingNet,
    inputs: Inputs,
    state: SpikingState,
    steps: int,
    beta: float | torch.Tensor = 0.0,
    target: torch.Tensor | None = None,
    record: SpikeRecord | None = None,
    phase: str = "free",
    on_step: StepHook | None = None,
) -> SpikingState:
    """`steps` timesteps; each step's spikes go to `record[phase]` and `on_step(old, new, spikes)`."""
    nudged = target is not None and not (isinstance(beta, float) and beta == 0.0)
    for _ in range(steps):
        new, spikes, counts = spiking_step(snet, inputs, state, beta, target if nudged else None)
        if record is not None:
            record.add(phase, counts)
        if on_step is not None:
            on_step(state, new, spikes)
        state = new
    return state


def spiking_free_phase(
    snet: SpikingNet, inputs: Inputs, steps: int, record: SpikeRecord | None = None, on_step: StepHook | None = None
) -> SpikingState:
    """β = 0 from a silent network, as the analog free phase starts from s = 0."""
    return run_phase(snet, inputs, init_state(snet, inputs), steps, record=record, phase="free", on_step=on_step)


class WindowMean:
    """Mean of the traces over steps [start, ∞) of a run (the readout window): an `on_step` hook."""

    def __init__(self, start: int) -> None:
        self.start = start
        self.sum: list[torch.Tensor] | None = None
        self.count = 0

    def __call__(self, old: SpikingState, new: SpikingState, spikes: list[torch.Tensor]) -> None:
        if new.t <= self.start:
            return
        if self.sum is None:
            self.sum = [tr.clone() for tr in new.traces]
        else:
            for acc, tr in zip(self.sum, new.traces):
                acc.add_(tr)
        self.count += 1

    def mean(self) -> State:
        if self.sum is None:
            raise ValueError("the readout window is empty: run more steps than its start")
        return [acc / self.count for acc in self.sum]
