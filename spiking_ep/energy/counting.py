"""Energy accounting: what one inference and one training sample cost, analog network vs spiking network.

Both networks run the same Φ (`analog_ep.phi`), so their costs are counted on the same graph, per
layer, per phase ("free", "nudge+", "nudge-", "cep", "update") and per *kind* of operation; a kind is
also the name of its price in an `EnergyProfile` (pJ per operation, TOML data in `spiking_ep/energy/profiles/`).
Energy is then Σ count × price: linear in every price, by construction.

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
    spike_generation  one per spike emitted (Loihi's active-minus-idle neuron update)

Learning ("update" phase, per sample, attributed to the layer each parameter feeds): analog symmetric
EP takes two Hebbian products per parameter (at s⁺ and s⁻), C-EP one per parameter and nudged step;
spike-driven EP with the trace rule one per parameter and accumulated step in both nudged phases
(2·W), spiking C-EP one per parameter and nudged step (as `spiking_ep.learning` counts them).

Break-even spike rate (docs/energy.md): the spiking energy is E(ρ) = E_fixed + ρ·N·c̄ with ρ the mean
spike rate of the spiking units (spikes per unit and step), N their unit-steps, c̄ the mean price of one
spike (fan-out × sop + spike_generation, weighted by the measured spike mix) and E_fixed everything
that does not scale with spikes (dense MACs, exps, neuron updates, attention winner events, learning).
Spiking pays off while ρ < ρ* = (E_analog − E_fixed)/(N·c̄); ρ* ≤ 0 means never.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import GraphSpec, one_hot_target

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

if TYPE_CHECKING:
    from spiking_ep.convert import SpikingNet
    from spiking_ep.dynamics import SpikeRecord
    from spiking_ep.learning import SpikingEPConfig

PROFILE_DIR = Path(__file__).with_name("profiles")
PRICES: dict[str, tuple[str, ...]] = {
    "analog": ("mac", "exp", "neuron_update", "synaptic_update"),
    "spiking": ("sop", "dense_mac", "exp", "neuron_update", "spike_generation", "synaptic_update"),
}
PJ_PER_UJ = 1e6


# ---------------------------------------------------------------- profiles (data, not code)
@dataclass(frozen=True)
class EnergyProfile:
    """Prices in pJ per operation for each backend, and where every number comes from."""

    name: str
    description: str
    analog: dict[str, float]
    spiking: dict[str, float]
    sources: dict[str, str]
    path: str | None = None

    def price(self, backend: str, kind: str) -> float:
        return getattr(self, backend)[kind]

    def with_prices(self, **changes: float) -> EnergyProfile:
        """A copy with some prices changed, keys "backend.kind" given as backend__kind (e.g. spiking__sop=1.0)."""
        analog, spiking, sources = dict(self.analog), dict(self.spiking), dict(self.sources)
        for key, value in changes.items():
            backend, kind = key.split("__")
            {"analog": analog, "spiking": spiking}[backend][kind] = float(value)
            sources[f"{backend}.{kind}"] = "changed in code"
        return EnergyProfile(self.name, self.description, analog, spiking, sources, self.path)

    def rows(self) -> list[tuple[str, float, str]]:
        """(constant, pJ, source) for every price: what a report must state."""
        return [(f"{b}.{k}", self.price(b, k), self.sources.get(f"{b}.{k}", "not given"))
                for b, kinds in PRICES.items() for k in kinds]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "path": self.path, "analog": self.analog,
                "spiking": self.spiking, "sources": self.sources}


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def load_profile(name_or_path: str | Path) -> EnergyProfile:
    """A shipped profile by name ("cmos45nm", "loihi") or a user TOML file (same format, optional `base`)."""
    path = Path(name_or_path)
    if not path.suffix and (PROFILE_DIR / f"{name_or_path}.toml").is_file():
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"no energy profile {name_or_path!r}: use one of {available_profiles()} or a .toml file "
                          f"(format: {PROFILE_DIR / 'cmos45nm.toml'})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return _parse_profile(raw, path)


def _parse_profile(raw: dict[str, Any], path: Path) -> EnergyProfile:
    unknown = set(raw) - {"name", "description", "base", "analog", "spiking", "sources"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: name, description, base, analog, "
                          "spiking, sources")
    base = load_profile(raw["base"]) if "base" in raw else None
    prices: dict[str, dict[str, float]] = {}
    sources = dict(base.sources) if base else {}
    for backend, kinds in PRICES.items():
        table = dict(getattr(base, backend)) if base else {}
        given = raw.get(backend) or {}
        extra = set(given) - set(kinds)
        if extra:
            raise ConfigError(f"{path}: unknown price(s) [{backend}] {sorted(extra)}; allowed: {list(kinds)}")
        for kind, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{path}: [{backend}] {kind} = {value!r} must be a number ≥ 0 (pJ per operation)")
            table[kind] = float(value)
            sources[f"{backend}.{kind}"] = f"{path.name} (no source given)"
        missing = [k for k in kinds if k not in table]
        if missing:
            raise ConfigError(f"{path}: [{backend}] lacks {missing} (pJ per operation), or set base = \"cmos45nm\"")
        prices[backend] = table
    sources.update({str(k): str(v) for k, v in (raw.get("sources") or {}).items()})
    name = str(raw.get("name", path.stem))
    return EnergyProfile(name, str(raw.get("description", name)), prices["analog"], prices["spiking"], sources,
                         str(path))


# ---------------------------------------------------------------- operation counts
@dataclass
class Counts:
    """Operations per sample of one backend: `ops[phase][layer][kind]`, plus the spiking rate model.

    `rate_model[layer]` (spiking units only): spikes per sample, fan-out, unit-steps; what the
    break-even rate scales.
    """

    backend: str
    layers: list[str]
    steps: dict[str, int] = field(default_factory=dict)
    ops: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    rate_model: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, phase: str, layer: str, kind: str, count: float) -> None:
        if kind not in PRICES[self.backend]:
            raise ValueError(f"{kind!r} is not a {self.backend} operation: {PRICES[self.backend]}")
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

    def energy_pj(self, profile: EnergyProfile, phase: str | None = None, layer: str | None = None,
                  kind: str | None = None) -> float:
        return sum(c * profile.price(self.backend, k) for _, _, k, c in self._rows(phase, layer, kind))

    def energy_by(self, profile: EnergyProfile, axis: str) -> dict[str, float]:
        """pJ per layer, phase or kind (in a stable order)."""
        keys = {"layer": self.layers, "phase": list(self.ops), "kind": list(PRICES[self.backend])}[axis]
        return {key: self.energy_pj(profile, **{axis: key}) for key in keys}

    def spikes(self) -> float:
        return sum(m["spikes"] for m in self.rate_model.values())

    def unit_steps(self) -> float:
        return sum(m["unit_steps"] for m in self.rate_model.values())

    def mean_rate(self) -> float:
        """Spikes per spiking unit and step (sigma-delta quanta counted one by one; may exceed 1)."""
        return self.spikes() / self.unit_steps() if self.unit_steps() else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "layers": self.layers, "steps": self.steps, "ops": self.ops,
                "rate_model": self.rate_model,
                "totals": {k: self.total(k) for k in PRICES[self.backend] if self.total(k)}}


def state_sizes(spec: GraphSpec) -> list[int]:
    """Units (state elements) per layer, in `spec.layer_names` order."""
    return ([spec.num_projections * spec.proj_len * spec.dim] if spec.num_projections else []) + list(spec.layers)


def layer_parameters(spec: GraphSpec) -> dict[str, int]:
    """Parameters feeding each layer (projection weights or pooling queries; FC weights and biases)."""
    names, P, d = spec.layer_names, spec.num_projections, spec.dim
    out = {}
    if P:
        out[names[0]] = P * spec.pool_queries * d if spec.pool_queries else P * d * d
    fan_in = spec.fc_input_size
    for k, size in enumerate(spec.layers):
        out[names[P + k]] = fan_in * size + size
        fan_in = size
    return out


def _analog_ops(spec: GraphSpec) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """(per relaxation step: layer → kind → count, once per sample: layer → MACs) of the analog network."""
    names, sizes, P = spec.layer_names, state_sizes(spec), spec.num_projections
    step: dict[str, dict[str, float]] = {name: {} for name in names}
    once = {name: 0.0 for name in names}
    for n, name in enumerate(names):
        row = step[name]
        if P and n == 0:
            rows, keys = P * spec.proj_len, spec.seq_len
            row["mac"] = sizes[1] * sizes[0]  # top-down query W₁ᵀh¹
            if spec.attention:
                row["mac"] += 2 * rows * keys * spec.dim  # scores and retrieval
                row["exp"] = rows * keys
            else:
                row["neuron_update"] = sizes[0]
            if not spec.pool_queries:
                once[name] = P * spec.seq_len * spec.dim * spec.dim  # X W₀ᵀ
            continue
        fan_in = spec.fc_input_size if n == P else sizes[n - 1]
        if n == 0:
            once[name] = fan_in * sizes[n]  # plain MLP: the constant input current W₀x
        else:
            row["mac"] = fan_in * sizes[n]
        if n + 1 < len(sizes):
            row["mac"] = row.get("mac", 0) + sizes[n + 1] * sizes[n]
        row["neuron_update"] = sizes[n]
    return step, once


def analog_counts(spec: GraphSpec, phases: Mapping[str, int], updates: Mapping[str, float] | None = None) -> Counts:
    """Analog operations per sample for phases {name: relaxation steps}; the input current is counted once
    (in the first phase); `updates` (layer → Hebbian products) go to phase "update"."""
    step, once = _analog_ops(spec)
    counts = Counts("analog", spec.layer_names)
    for i, (phase, steps) in enumerate(phases.items()):
        counts.steps[phase] = steps
        for layer, kinds in step.items():
            for kind, c in kinds.items():
                counts.add(phase, layer, kind, c * steps)
            if i == 0:
                counts.add(phase, layer, "mac", once[layer])
    for layer, c in (updates or {}).items():
        counts.add("update", layer, "synaptic_update", c)
    return counts


PhaseSpikes = Mapping[str, tuple[int, Mapping[str, float]]]  # phase → (steps, spikes per sample by layer)


def record_phases(record: SpikeRecord) -> dict[str, tuple[int, dict[str, float]]]:
    """A `SpikeRecord`'s phases as (steps, spikes per sample by layer)."""
    return {p: (record.steps(p), record.spikes_per_sample(p)) for p in record.phases}


def spiking_counts(snet: SpikingNet, phases: PhaseSpikes, updates: Mapping[str, float] | None = None) -> Counts:
    """Spiking operations per sample from measured spikes; the cost constants are `new_record`'s."""
    from spiking_ep.dynamics import new_record

    spec = snet.spec
    rec = new_record(snet, 0)
    names, sizes = rec.layer_names, state_sizes(spec)
    attention = [snet.is_attention_layer(n) for n in range(len(names))]
    counts = Counts("spiking", names)
    for i, (phase, (steps, spikes)) in enumerate(phases.items()):
        counts.steps[phase] = steps
        for n, name in enumerate(names):
            counts.add(phase, name, "neuron_update", rec.neuron_updates_per_step[n] * steps)
            counts.add(phase, name, "spike_generation", spikes[name])
            if attention[n]:
                continue  # winner events: the rows send real vectors, priced as dense MACs below
            for m in (n - 1, n + 1):  # every spike reaches every unit of both neighbours
                if 0 <= m < len(names):
                    counts.add(phase, names[m], "sop", spikes[name] * sizes[m])
            model = counts.rate_model.setdefault(name, {"spikes": 0.0, "fan_out": rec.fan_out[n], "unit_steps": 0.0})
            model["spikes"] += spikes[name]
            model["unit_steps"] += rec.layer_units[n] * steps
        if attention[0]:
            counts.add(phase, names[0], "dense_mac", rec.dense_macs_per_step["attention_scores"] * steps)
            counts.add(phase, names[0], "exp", rec.softmax_exps_per_step * steps)
            counts.add(phase, names[1], "dense_mac", rec.dense_macs_per_step["attention_values"] * steps)
            if snet.attention.mode == "dense":  # the ablation sends the retrieval itself: a·K MACs
                counts.add(phase, names[0], "dense_mac", rec.dense_macs_per_step["attention_scores"] * steps)
        if i == 0:
            counts.add(phase, names[0], "dense_mac", sum(rec.dense_macs_per_sample.values()))
    for layer, c in (updates or {}).items():
        counts.add("update", layer, "synaptic_update", c)
    return counts


# ---------------------------------------------------------------- training samples
def analog_training_counts(spec: GraphSpec, free_steps: int, nudge_steps: int) -> dict[str, Counts]:
    """One training sample of analog symmetric EP (T₁ + K + K steps) and of C-EP (T₁ + K, per-step updates)."""
    params = layer_parameters(spec)
    return {
        "ep_symmetric": analog_counts(spec, {"free": free_steps, "nudge+": nudge_steps, "nudge-": nudge_steps},
                                      {k: 2 * v for k, v in params.items()}),
        "cep": analog_counts(spec, {"free": free_steps, "cep": nudge_steps},
                             {k: nudge_steps * v for k, v in params.items()}),
    }


@torch.no_grad()
def spiking_training_counts(snet: SpikingNet, x: torch.Tensor, y: torch.Tensor, cfg: SpikingEPConfig
                            ) -> dict[str, Counts]:
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
        "ep_symmetric": spiking_counts(snet, phases, {k: 2 * window * v for k, v in params.items()}),
        "cep": spiking_counts(snet, {"free": phases["free"], "cep": phases["nudge+"]},
                              {k: cfg.nudge_steps * v for k, v in params.items()}),
    }


# ---------------------------------------------------------------- the comparison
@dataclass
class Comparison:
    """Analog vs spiking energy of one task (an inference or a training sample) under one profile."""

    profile: str
    analog_pj: float
    spiking_pj: float
    fixed_pj: float  # spiking energy that does not scale with the spike rate
    per_spike_pj: float  # mean price of one spike: fan-out × sop + spike_generation
    mean_rate: float  # spikes per spiking unit and step
    unit_steps: float
    break_even_rate: float  # ρ*: spiking pays off below it; ≤ 0: never

    @property
    def ratio(self) -> float:
        """analog / spiking: > 1 means the spiking network uses less energy."""
        return self.analog_pj / self.spiking_pj if self.spiking_pj else float("inf")

    @property
    def pays_off(self) -> bool:
        return self.spiking_pj < self.analog_pj

    def verdict(self) -> str:
        if self.break_even_rate <= 0:
            return (f"never: the parts that do not scale with spikes alone cost {self.fixed_pj / PJ_PER_UJ:.3g} µJ "
                    f"≥ analog {self.analog_pj / PJ_PER_UJ:.3g} µJ")
        if self.pays_off:
            return f"pays off: rate {self.mean_rate:.3g} < break-even {self.break_even_rate:.3g}"
        return f"does not pay off: rate {self.mean_rate:.3g} > break-even {self.break_even_rate:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "analog_pj": self.analog_pj, "spiking_pj": self.spiking_pj,
                "ratio_analog_over_spiking": self.ratio, "pays_off": self.pays_off, "fixed_pj": self.fixed_pj,
                "per_spike_pj": self.per_spike_pj, "mean_rate": self.mean_rate, "unit_steps": self.unit_steps,
                "break_even_rate": self.break_even_rate, "verdict": self.verdict()}


def compare(analog: Counts, spiking: Counts, profile: EnergyProfile) -> Comparison:
    """Energies, ratio, mean spike rate and the break-even rate ρ* = (E_analog − E_fixed)/(N·c̄)."""
    e_analog, e_spiking = analog.energy_pj(profile), spiking.energy_pj(profile)
    sop, gen = profile.price("spiking", "sop"), profile.price("spiking", "spike_generation")
    model = spiking.rate_model
    variable = sum(m["spikes"] * (m["fan_out"] * sop + gen) for m in model.values())
    spikes, unit_steps = spiking.spikes(), spiking.unit_steps()
    if spikes > 0:
        per_spike = variable / spikes
    else:  # silent network: the price of a spike if every unit fired equally often
        per_spike = sum(m["unit_steps"] * (m["fan_out"] * sop + gen) for m in model.values()) / max(unit_steps, 1)
    fixed = e_spiking - variable
    denominator = unit_steps * per_spike
    break_even = (e_analog - fixed) / denominator if denominator > 0 else float("inf")
    return Comparison(profile.name, e_analog, e_spiking, fixed, per_spike, spiking.mean_rate(), unit_steps, break_even)


def spiking_energy_at_rate(comparison: Comparison, rate: float) -> float:
    """E(ρ) = E_fixed + ρ·N·c̄: the spiking energy if every spiking unit's rate were scaled to `rate`."""
    return comparison.fixed_pj + rate * comparison.unit_steps * comparison.per_spike_pj
