"""Operation counts: what one inference and one training sample *do*, analog network vs spiking network.

Both networks run the same Φ (`analog_ep.phi`), so their costs are counted on the same graph, per
layer, per phase ("free", "nudge+", "nudge-", "cep", "update") and per *kind* of operation; a kind is
also the name of its price in an `EnergyProfile` (`pricing`, pJ per operation). Energy is then
Σ count × price: linear in every price, by construction.

Analog (rate) network, per relaxation step (each synapse is used twice per step: bottom-up W a into
the layer above, top-down Wᵀ h into the layer below; costs are attributed to the *receiving* layer):

    FC layer n      fan_in·n MACs bottom-up + n·n_above MACs top-down, n unit updates
    projection      n₁·(P·Lq·d) MACs for the top-down query W₁ᵀh¹; with attention 2·P·Lq·Lk·d MACs
                    (scores q·kᵀ and retrieval a·K) and P·Lq·Lk exps (softmax); Lq = m with pooling
    once per sample the input current X W₀ᵀ (P·L·d·d MACs; none with learned pooling queries), or the
                    first FC layer's W₀x for a plain MLP (constant input, computed once on both sides)

Spiking network, measured spikes S_n (|spikes|: a sigma-delta spike of n quanta counts n):

    sop               S_m × size(n) for every spiking neighbour m of n (Σ = Σ_m S_m × fan_out_m)
    dense_mac         attention scores (proj), value path W₁ flat(s¹) (fc1), input current (once)
    exp               softmax of the attention, every step
    neuron_update     every unit (and attention pointer unit) every step
    (event-driven attention: no pointer units and no spike-driven query; per event, i.e. per sample
     whose fc1 trace drifted: query W₁ᵀh¹, scores, retrieval (proj) and value path (fc1) dense MACs and
     the softmax's exps; the drift detector is n₁ neuron updates per step)
    spike_generation  one per spike emitted (Loihi's active-minus-idle neuron update)

Memory traffic (optional kind `weight_read`, `memory=True`; off by default): one read of one weight per
weight-MAC and per synaptic operation. Analog: every MAC but the attention's scores and retrieval (those
read keys, not weights). Spiking: every `sop`, the value path W₁ flat(s¹) and the input current; the
scores again read keys. State reads, spike routing and the learning rule's weight writes are not counted.

Learning ("update" phase, per sample, attributed to the layer each parameter feeds): analog symmetric
EP takes two Hebbian products per parameter (at s⁺ and s⁻), C-EP one per parameter and nudged step;
spike-driven EP with the trace rule one per parameter and accumulated step in both nudged phases
(2·W), spiking C-EP one per parameter and nudged step (as `spiking_ep.learning` counts them).

Prices and the comparison built on these counts: `spiking_ep.energy.pricing`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from analog_ep.phi import GraphSpec, one_hot_target

if TYPE_CHECKING:
    from spiking_ep.convert import SpikingNet
    from spiking_ep.dynamics import SpikeRecord
    from spiking_ep.learning import SpikingEPConfig



class PriceList(Protocol):
    """What counting needs of a price list (`pricing.EnergyProfile` is one): pJ per operation kind."""

    def price(self, backend: str, kind: str) -> float: ...


# the operation kinds of each backend; each is also the name of its price in an EnergyProfile
PRICES: dict[str, tuple[str, ...]] = {
    "analog": ("mac", "exp", "neuron_update", "synaptic_update"),
    "spiking": ("sop", "dense_mac", "exp", "neuron_update", "spike_generation", "synaptic_update"),
}
# kinds counted only on request (`memory=True`) and priced only where a profile gives a cited constant
OPTIONAL_PRICES: dict[str, tuple[str, ...]] = {"analog": ("weight_read",), "spiking": ("weight_read",)}


def all_kinds(backend: str) -> tuple[str, ...]:
    """The required and the optional operation kinds of a backend."""
    return PRICES[backend] + OPTIONAL_PRICES[backend]


# ---------------------------------------------------------------- operation counts
@dataclass
class Counts:
    """Operations per sample of one backend: `ops[phase][layer][kind]`, plus the spiking rate model.

    `rate_model[layer]` (spiking units only): spikes per sample, fan-out, units, unit-steps; what the
    break-even rate scales and what spikes per synapse are counted on.
    """

    backend: str
    layers: list[str]
    steps: dict[str, int] = field(default_factory=dict)
    ops: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rate_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, phase: str, layer: str, kind: str, count: float) -> None:
        if kind not in all_kinds(self.backend):
            raise ValueError(f"{kind!r} is not a {self.backend} operation: {all_kinds(self.backend)}")
        if count:
            row = self.ops.setdefault(phase, {}).setdefault(layer, {})
            row[kind] = row.get(kind, 0.0) + float(count)

    def _rows(self, phase: str | None, layer: str | None, kind: str | None):
        for p, layers in self.ops.items():
            for lay, kinds in layers.items():
                for k, c in kinds.items():
                    if (phase in (None, p)) and (layer in (None, lay)) and (kind in (None, k)):
                        yield p, lay, k, c

    def total(self, kind: str | None = None, phase: str | None = None, layer: str | None = None) -> float:
        return sum(c for *_, c in self._rows(phase, layer, kind))

    def energy_pj(self, profile: PriceList, phase: str | None = None, layer: str | None = None,
                  kind: str | None = None) -> float:
        return sum(c * profile.price(self.backend, k) for _, _, k, c in self._rows(phase, layer, kind))

    def energy_by(self, profile: PriceList, axis: str) -> dict[str, float]:
        """pJ per layer, phase or kind (in a stable order)."""
        keys = {"layer": self.layers, "phase": list(self.ops), "kind": list(all_kinds(self.backend))}[axis]
        return {key: self.energy_pj(profile, **{axis: key}) for key in keys}

    def spikes(self) -> float:
        return sum(m["spikes"] for m in self.rate_model.values())

    def unit_steps(self) -> float:
        return sum(m["unit_steps"] for m in self.rate_model.values())

    def mean_rate(self) -> float:
        """Spikes per spiking unit and step (sigma-delta quanta counted one by one; may exceed 1)."""
        return self.spikes() / self.unit_steps() if self.unit_steps() else 0.0

    def synapses(self) -> float:
        """Spike-driven synapses: Σ units × fan-out over the spiking layers (docs/energy.md, "synapse").

        A symmetric weight between two spiking layers is two synapses (bottom-up and top-down); the
        attention rows' value path and scores carry real values and are no synapses here.
        """
        return sum(m["units"] * m["fan_out"] for m in self.rate_model.values())

    def spikes_per_synapse(self) -> float:
        """Spike events delivered per synapse and sample: Σ S_n·fan_out_n / Σ units_n·fan_out_n (= SOPs / synapses)."""
        synapses = self.synapses()
        return sum(m["spikes"] * m["fan_out"] for m in self.rate_model.values()) / synapses if synapses else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "layers": self.layers, "steps": self.steps, "ops": self.ops,
                "rate_model": self.rate_model,
                "totals": {k: self.total(k) for k in all_kinds(self.backend) if self.total(k)},
                **({"synapses": self.synapses(), "spikes_per_synapse": self.spikes_per_synapse()}
                   if self.rate_model else {})}


def state_sizes(spec: GraphSpec) -> list[int]:
    """Units (state elements) per layer, in `spec.layer_names` order."""
    return ([spec.num_projections * spec.proj_len * spec.dim] if spec.num_projections else []) + list(spec.layers)


def first_fc_layer(spec: GraphSpec) -> int:
    """Index of the first FC layer in `spec.layer_names`: all P projections share one layer, "proj"."""
    return 1 if spec.num_projections else 0


def layer_parameters(spec: GraphSpec) -> dict[str, int]:
    """Parameters feeding each layer (projection weights or pooling queries; FC weights and biases).

    Example: the tiny SNLI graph (4 projections of 8×8, FC 4·6·8 → 24 → 3).

        >>> from analog_ep.models import build_spec
        >>> layer_parameters(build_spec("snli", tiny=True))
        {'proj': 256, 'fc1': 4632, 'out': 75}
    """
    names, P, d = spec.layer_names, spec.num_projections, spec.dim
    out = {}
    if P:
        out[names[0]] = P * spec.pool_queries * d if spec.pool_queries else P * d * d
    fan_in, first_fc = spec.fc_input_size, first_fc_layer(spec)
    for k, size in enumerate(spec.layers):
        out[names[first_fc + k]] = fan_in * size + size
        fan_in = size
    return out


def _analog_ops(spec: GraphSpec) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(per relaxation step: layer → kind → count, once per sample: layer → MACs) of the analog network.

    Every step's MACs read one weight each except the attention's scores and retrieval (they read keys):
    `weight_read` per step is counted alongside; the once-per-sample MACs all read weights.
    """
    names, sizes, P = spec.layer_names, state_sizes(spec), spec.num_projections
    first_fc = first_fc_layer(spec)
    step: dict[str, dict[str, float]] = {name: {} for name in names}
    once = {name: 0.0 for name in names}
    for n, name in enumerate(names):
        row = step[name]
        if P and n == 0:
            rows, keys = P * spec.proj_len, spec.seq_len
            row["mac"] = row["weight_read"] = sizes[1] * sizes[0]  # top-down query W₁ᵀh¹
            if spec.attention:
                row["mac"] += 2 * rows * keys * spec.dim  # scores and retrieval
                row["exp"] = rows * keys
            else:
                row["neuron_update"] = sizes[0]
            if not spec.pool_queries:
                once[name] = P * spec.seq_len * spec.dim * spec.dim  # X W₀ᵀ
            continue
        fan_in = spec.fc_input_size if n == first_fc else sizes[n - 1]
        if n == 0:
            once[name] = fan_in * sizes[n]  # plain MLP: the constant input current W₀x
        else:
            row["mac"] = fan_in * sizes[n]
        if n + 1 < len(sizes):
            row["mac"] = row.get("mac", 0) + sizes[n + 1] * sizes[n]
        row["neuron_update"] = sizes[n]
        row["weight_read"] = row.get("mac", 0)
    return step, once


def analog_counts(spec: GraphSpec, phases: Mapping[str, int], updates: Mapping[str, float] | None = None,
                  memory: bool = False) -> Counts:
    """Analog operations per sample for phases {name: relaxation steps}; the input current is counted once
    (in the first phase); `updates` (layer → Hebbian products) go to phase "update"; `memory`: weight reads."""
    step, once = _analog_ops(spec)
    counts = Counts("analog", spec.layer_names)
    for i, (phase, steps) in enumerate(phases.items()):
        counts.steps[phase] = steps
        for layer, kinds in step.items():
            for kind, c in kinds.items():
                if kind != "weight_read" or memory:
                    counts.add(phase, layer, kind, c * steps)
            if i == 0:
                counts.add(phase, layer, "mac", once[layer])
                if memory:
                    counts.add(phase, layer, "weight_read", once[layer])
    for layer, c in (updates or {}).items():
        counts.add("update", layer, "synaptic_update", c)
    return counts


PhaseSpikes = Mapping[str, tuple[int, Mapping[str, float]]]  # phase → (steps, spikes per sample by layer)


def record_phases(record: SpikeRecord) -> dict[str, tuple[int, dict[str, float]]]:
    """A `SpikeRecord`'s phases as (steps, spikes per sample by layer)."""
    return {p: (record.steps(p), record.spikes_per_sample(p)) for p in record.phases}


def spiking_counts(snet: SpikingNet, phases: PhaseSpikes, updates: Mapping[str, float] | None = None,
                   memory: bool = False) -> Counts:
    """Spiking operations per sample from measured spikes; the cost constants are `new_record`'s;
    `memory`: weight reads (one per sop, per value-path MAC and per input-current MAC)."""
    from spiking_ep.dynamics import new_record

    spec = snet.spec
    rec = new_record(snet, 0)
    names, sizes = rec.layer_names, state_sizes(spec)
    attention = [snet.is_attention_layer(n) for n in range(len(names))]
    events = snet.attention.holds_rows  # event-driven attention: its count is recomputes, priced as dense work
    counts = Counts("spiking", names)
    for i, (phase, (steps, spikes)) in enumerate(phases.items()):
        counts.steps[phase] = steps
        for n, name in enumerate(names):
            counts.add(phase, name, "neuron_update", rec.neuron_updates_per_step[n] * steps)
            if not (attention[n] and events):
                counts.add(phase, name, "spike_generation", spikes[name])
            if attention[n]:
                continue  # winner events: the rows send real vectors, priced as dense MACs below
            for m in (n - 1, n + 1):  # every spike reaches every unit of both neighbours
                if 0 <= m < len(names) and not (attention[m] and events):  # events: the query is dense
                    counts.add(phase, names[m], "sop", spikes[name] * sizes[m])
                    if memory:
                        counts.add(phase, names[m], "weight_read", spikes[name] * sizes[m])
            model = counts.rate_model.setdefault(name, {"spikes": 0.0, "fan_out": rec.fan_out[n],
                                                        "units": rec.layer_units[n], "unit_steps": 0.0})
            model["spikes"] += spikes[name]
            model["unit_steps"] += rec.layer_units[n] * steps
        if attention[0] and events:
            _add_attention_events(counts, rec, phase, spikes[names[0]], memory)
        elif attention[0]:
            counts.add(phase, names[0], "dense_mac", rec.dense_macs_per_step["attention_scores"] * steps)
            counts.add(phase, names[0], "exp", rec.softmax_exps_per_step * steps)
            counts.add(phase, names[1], "dense_mac", rec.dense_macs_per_step["attention_values"] * steps)
            if memory:
                counts.add(phase, names[1], "weight_read", rec.dense_macs_per_step["attention_values"] * steps)
            if snet.attention.mode == "dense":  # the ablation sends the retrieval itself: a·K MACs
                counts.add(phase, names[0], "dense_mac", rec.dense_macs_per_step["attention_scores"] * steps)
        if i == 0:
            counts.add(phase, names[0], "dense_mac", sum(rec.dense_macs_per_sample.values()))
            if memory:
                counts.add(phase, names[0], "weight_read", sum(rec.dense_macs_per_sample.values()))
    for layer, c in (updates or {}).items():
        counts.add("update", layer, "synaptic_update", c)
    return counts


def _add_attention_events(counts: Counts, rec: SpikeRecord, phase: str, events: float, memory: bool) -> None:
    """Event-driven attention: per event the query W₁ᵀh¹, scores, softmax and retrieval (proj) and the
    value path's change W₁ Δflat(s¹) (fc1); the W₁ products read weights, scores and retrieval read keys."""
    names, per_event = rec.layer_names, rec.dense_macs_per_event
    counts.add(phase, names[0], "dense_mac", (per_event["query"] + per_event["scores"] + per_event["retrieval"])
               * events)
    counts.add(phase, names[0], "exp", rec.exps_per_event * events)
    counts.add(phase, names[1], "dense_mac", per_event["values"] * events)
    if memory:
        counts.add(phase, names[0], "weight_read", per_event["query"] * events)
        counts.add(phase, names[1], "weight_read", per_event["values"] * events)


# ---------------------------------------------------------------- training samples
def analog_training_counts(spec: GraphSpec, free_steps: int, nudge_steps: int, memory: bool = False
                           ) -> dict[str, Counts]:
    """One training sample of analog symmetric EP (T₁ + K + K steps) and of C-EP (T₁ + K, per-step updates)."""
    params = layer_parameters(spec)
    return {
        "ep_symmetric": analog_counts(spec, {"free": free_steps, "nudge+": nudge_steps, "nudge-": nudge_steps},
                                      {k: 2 * v for k, v in params.items()}, memory),
        "cep": analog_counts(spec, {"free": free_steps, "cep": nudge_steps},
                             {k: nudge_steps * v for k, v in params.items()}, memory),
    }


@torch.no_grad()
def spiking_training_counts(snet: SpikingNet, x: torch.Tensor, y: torch.Tensor, cfg: SpikingEPConfig,
                            memory: bool = False) -> dict[str, Counts]:
    """Measured spikes of one spike-driven training step on (x, y): symmetric EP (trace rule) and C-EP.

    The free phase and the two nudged phases are run with their own records (same units and noise as
    the stacked ±β batch of `spiking_ep_symmetric`: a clone carries the neuron and generator state).
    C-EP's nudged phase is the +β phase (its weights move by η per step, a negligible change of spikes).
    """
    from spiking_ep.dynamics import new_record, run_phase, spiking_free_phase

    net = snet.net
    inputs = net.prepare(x.to(net.weights[0].dtype))
    target = one_hot_target(y, net.spec.num_classes, net.weights[0].dtype)
    record = new_record(snet, inputs.batch_size)
    free = spiking_free_phase(snet, inputs, cfg.free_steps, record=record)
    for sign, phase in ((1.0, "nudge+"), (-1.0, "nudge-")):
        run_phase(snet, inputs, free.clone(), cfg.nudge_steps, beta=sign * cfg.beta, target=target, record=record,
                  phase=phase)
    phases = record_phases(record)
    params = layer_parameters(net.spec)
    window = cfg.accumulate_steps
    return {
        "ep_symmetric": spiking_counts(snet, phases, {k: 2 * window * v for k, v in params.items()}, memory),
        "cep": spiking_counts(snet, {"free": phases["free"], "cep": phases["nudge+"]},
                              {k: cfg.nudge_steps * v for k, v in params.items()}, memory),
    }
