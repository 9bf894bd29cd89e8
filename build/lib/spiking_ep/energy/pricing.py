"""Prices: energy profiles (pJ per operation, data in `profiles/*.toml`) and what they make of the counts.

A profile prices every operation kind of `counting.PRICES` for both backends and names the source of
every number. The optional kinds (`counting.OPTIONAL_PRICES`: weight reads) are priced only where a
profile gives them; the shipped profiles do not (no cited per-read constant is in the repository), and
`unpriced` names what a report counted but could not price. The shipped profiles and yours live in one
registry: `load_profile(name)` reads a shipped TOML file on first use, `register_profile` adds an
`EnergyProfile` or a TOML file of your own.

Break-even spike rate (docs/energy.md): the spiking energy is E(ρ) = E_fixed + ρ·N·c̄ with ρ the mean
spike rate of the spiking units (spikes per unit and step), N their unit-steps, c̄ the mean price of one
spike (fan-out × sop + spike_generation, weighted by the measured spike mix) and E_fixed everything
that does not scale with spikes (dense MACs, exps, neuron updates, attention winner events, learning).
Spiking pays off while ρ < ρ* = (E_analog − E_fixed)/(N·c̄); ρ* ≤ 0 means never.

Example:
    >>> available_profiles()
    ['cmos45nm', 'loihi']
    >>> from dataclasses import replace
    >>> cheap = replace(load_profile("loihi").with_prices(spiking__sop=1.0), name="loihi_cheap_sop")
    >>> _ = register_profile(cheap)
    >>> load_profile("loihi_cheap_sop").price("spiking", "sop"), load_profile("loihi").price("spiking", "sop")
    (1.0, 23.6)
    >>> unregister_profile("loihi_cheap_sop")
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analog_ep.errors import ConfigError
from spiking_ep.energy.counting import OPTIONAL_PRICES, PRICES, Counts, all_kinds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_DIR = Path(__file__).with_name("profiles")
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
        """pJ per operation; an optional kind the profile does not price costs 0 (see `unpriced`)."""
        table = getattr(self, backend)
        if kind not in table and kind in OPTIONAL_PRICES[backend]:
            return 0.0
        return table[kind]

    def unpriced(self, counts: Counts) -> list[str]:
        """Optional kinds ("backend.kind") that `counts` holds and this profile gives no price for."""
        return [f"{counts.backend}.{k}" for k in OPTIONAL_PRICES[counts.backend]
                if counts.total(k) and k not in getattr(self, counts.backend)]

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
                for b in PRICES for k in all_kinds(b) if k in getattr(self, b)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "path": self.path, "analog": self.analog,
                "spiking": self.spiking, "sources": self.sources}


# ---------------------------------------------------------------- the profile registry
# name → a profile, or the TOML file it is read from when first asked for (the shipped ones)
PROFILES: dict[str, EnergyProfile | Path] = {path.stem: path for path in sorted(PROFILE_DIR.glob("*.toml"))}


def register_profile(profile: EnergyProfile | str | Path, *, replace: bool = False) -> EnergyProfile:
    """Make a profile available by its name: an `EnergyProfile`, or a TOML file (read now, checked now).

    Registered names work wherever a shipped one does: `load_profile`, `CompareOptions.profiles`, a TOML
    file's `base = "name"` and `seqep compare --profile name` in the same process.
    """
    if not isinstance(profile, EnergyProfile):
        profile = read_profile_file(Path(profile))
    if profile.name in PROFILES and not replace:
        raise ConfigError(f"energy profile {profile.name!r} is already registered; pass replace=True to redefine it")
    PROFILES[profile.name] = profile
    return profile


def unregister_profile(name: str) -> None:
    """Forget a registered profile (a shipped one comes back only by registering its file again)."""
    PROFILES.pop(name, None)


def available_profiles() -> list[str]:
    """Names of the registered profiles (the shipped TOML files and yours), sorted."""
    return sorted(PROFILES)


def load_profile(name_or_path: str | Path) -> EnergyProfile:
    """A registered profile by name ("cmos45nm", "loihi", yours) or a TOML file (same format, optional `base`)."""
    key = str(name_or_path)
    if key in PROFILES:
        entry = PROFILES[key]
        if isinstance(entry, Path):
            entry = PROFILES[key] = read_profile_file(entry)
        return entry
    path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"no energy profile {key!r}: use one of {available_profiles()}, a .toml file "
                          f"(format: {PROFILE_DIR / 'cmos45nm.toml'}) or spiking_ep.energy.pricing.register_profile")
    return read_profile_file(path)


def read_profile_file(path: Path) -> EnergyProfile:
    """Parse and check one profile TOML file."""
    if not path.is_file():
        raise ConfigError(f"no energy profile file {path}")
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
        extra = set(given) - set(all_kinds(backend))
        if extra:
            raise ConfigError(f"{path}: unknown price(s) [{backend}] {sorted(extra)}; allowed: "
                              f"{list(all_kinds(backend))}")
        for kind, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{path}: [{backend}] {kind} = {value!r} must be a number ≥ 0 (pJ per operation)")
            table[kind] = float(value)
            sources[f"{backend}.{kind}"] = f"{path.name} (no source given)"
            if kind in OPTIONAL_PRICES[backend] and f"{backend}.{kind}" not in (raw.get("sources") or {}):
                raise ConfigError(f"{path}: [{backend}] {kind} needs its source: add "
                                  f'"{backend}.{kind}" = "where the number comes from" under [sources]')
        missing = [k for k in kinds if k not in table]
        if missing:
            raise ConfigError(f"{path}: [{backend}] lacks {missing} (pJ per operation), or set base = \"cmos45nm\"")
        prices[backend] = table
    sources.update({str(k): str(v) for k, v in (raw.get("sources") or {}).items()})
    name = str(raw.get("name", path.stem))
    return EnergyProfile(name, str(raw.get("description", name)), prices["analog"], prices["spiking"], sources,
                         str(path))


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
    unpriced: tuple[str, ...] = ()  # optional kinds counted but not priced by the profile

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
                "break_even_rate": self.break_even_rate, "verdict": self.verdict(), "unpriced": list(self.unpriced)}


def compare(analog: Counts, spiking: Counts, profile: EnergyProfile) -> Comparison:
    """Energies, ratio, mean spike rate and the break-even rate ρ* = (E_analog − E_fixed)/(N·c̄)."""
    e_analog, e_spiking = analog.energy_pj(profile), spiking.energy_pj(profile)
    # a spike's synaptic events each read a weight where memory traffic is counted and priced
    read = profile.price("spiking", "weight_read") if spiking.total("weight_read") else 0.0
    sop, gen = profile.price("spiking", "sop") + read, profile.price("spiking", "spike_generation")
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
    unpriced = tuple(profile.unpriced(analog) + profile.unpriced(spiking))
    return Comparison(profile.name, e_analog, e_spiking, fixed, per_spike, spiking.mean_rate(), unit_steps, break_even,
                      unpriced)


def spiking_energy_at_rate(comparison: Comparison, rate: float) -> float:
    """E(ρ) = E_fixed + ρ·N·c̄: the spiking energy if every spiking unit's rate were scaled to `rate`."""
    return comparison.fixed_pj + rate * comparison.unit_steps * comparison.per_spike_pj
