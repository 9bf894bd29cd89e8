"""`seqep compare`: measure accuracy, spikes and energy of a trained run, analog vs spiking.

    report = compare_run("runs/demo", options=CompareOptions(timesteps=(8, 16, 32, 64), profiles=("loihi",)))

writes RUN_DIR/compare/{compare.json, compare.md, plots/*.png} (`report`, `plots`). Accuracy, agreement
and spikes come from `evaluate_spiking` (one spiking run to max T, read at every T); energy from `counting`
and `pricing` on those measured spikes; per-unit firing rates and the raster from a short probe run on the first
samples; the training-sample cost from one measured spike-driven EP step per T. The analog side runs
T₁ = the run's `ep.eval_free_steps` (else `ep.free_steps`) relaxation steps, exactly as
`seqep evaluate` does, so its accuracy and its energy describe the same computation.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from analog_ep.errors import ConfigError
from analog_ep.train import distributed
from analog_ep.train.config import EPSection
from analog_ep.train.run_dir import software_versions
from spiking_ep.convert import SpikingNet
from spiking_ep.dynamics import SpikingState, spiking_free_phase
from spiking_ep.energy.counting import (
    Counts,
    analog_counts,
    analog_training_counts,
    spiking_counts,
    spiking_training_counts,
)
from spiking_ep.energy.literature import spike_rate_verdict, spikes_per_synapse_verdict
from spiking_ep.energy.pricing import EnergyProfile, compare, load_profile
from spiking_ep.energy.report import write_report
from spiking_ep.evaluate import evaluate_spiking, read_run_config, run_batches

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
DEFAULT_TIMESTEPS = (8, 16, 32, 64)
DEFAULT_PROFILES = ("cmos45nm", "loihi")
CAVEATS = (
    "Counts are operations per sample of an idealised digital implementation; state reads, spike routing and "
    "static power are not priced; weight reads only with `--memory` and a profile that prices `weight_read` "
    "with a cited source (the shipped profiles do not: no per-read constant is cited in the repository).",
    "The analog network is priced at its configured step count T₁; an early exit on the residual would lower it.",
    "Sigma-delta spikes carry n quanta and are counted as n spikes (n synaptic operations per synapse): "
    "conservative for graded-spike hardware (Loihi 2), where one message carries n.",
    "The attention scores, softmax and the value path into the first FC layer are not spike-driven: priced as "
    "dense MACs on both sides. With real-valued word vectors they dominate; event-driven attention "
    "(`--attention event`) pays them only when fc1's trace has moved (docs/energy.md, energy levers).",
    "Loihi prices are simulated lower bounds (Davies et al. 2018); dense parts are placed on a 45 nm CMOS "
    "co-processor, the analog network on the same 45 nm CMOS accelerator.",
    "Spiking training: free T, ±β nudged T/2 steps each, trace-rule Hebbian window T/4 (every synapse every "
    "window step); measured on the first evaluated samples.",
)


@dataclass
class CompareOptions:
    """What to measure. Profiles are names of shipped profiles or paths of user TOML files."""

    timesteps: Sequence[int] = DEFAULT_TIMESTEPS
    profiles: Sequence[str] = DEFAULT_PROFILES
    probe_samples: int = 16  # samples of the probe run (firing-rate histograms, raster) and training step
    threads: int | None = 1  # torch threads while measuring (None: leave as is); see `torch_threads`
    plots: bool = True
    progress: bool = True
    command: str = ""
    label: str = ""  # what was compared (the run directory): the report's title
    data: dict[str, Any] = field(default_factory=dict)  # where the batches come from, for the report
    memory: bool = False  # count weight reads (the optional kind `weight_read`) on both sides


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch threads. The spiking steps are many small products: on a shared 2-core CPU two
    OpenMP threads oversubscribe the cores and ran 10× slower than one (measured: 512 IMDB smoke
    reviews to T = 64 in 1.6 s with one thread, 16.5 s with two, at a load average of 5.7)."""
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def ep_settings(run_dir: str | Path) -> EPSection:
    """The run's [ep] section (defaults where the run has no config.json: a bare checkpoint)."""
    raw = (read_run_config(run_dir).get("ep") or {})
    known = {k: v for k, v in raw.items() if k in EPSection.__dataclass_fields__}
    return EPSection(**known)


# ---------------------------------------------------------------- probe: per-unit spikes of a few samples
class SpikeProbe:
    """`on_step` hook: per-unit |spike| counts of every spiking layer, and sample 0's spikes per step."""

    def __init__(self, snet: SpikingNet) -> None:
        self.names = snet.spec.layer_names
        self.layers = [n for n in range(len(self.names)) if not snet.is_attention_layer(n)]
        self.counts: dict[str, torch.Tensor] = {}
        self.raster: dict[str, list[torch.Tensor]] = {self.names[n]: [] for n in self.layers}
        self.steps = 0

    def __call__(self, old: SpikingState, new: SpikingState, spikes: list[torch.Tensor]) -> None:
        self.steps += 1
        for n in self.layers:
            s = spikes[n].reshape(spikes[n].shape[0], -1).double()
            name = self.names[n]
            self.counts[name] = self.counts.get(name, 0) + s.abs()
            self.raster[name].append(s[0].clone())

    def firing_rates(self) -> dict[str, list[float]]:
        """Per unit: spikes per step, averaged over the probe samples."""
        return {k: (v.mean(0) / max(self.steps, 1)).tolist() for k, v in self.counts.items()}

    def raster_matrix(self) -> dict[str, list[list[float]]]:
        """Per layer: (steps, units) signed spikes of sample 0."""
        return {k: torch.stack(v).tolist() for k, v in self.raster.items() if v}


# ---------------------------------------------------------------- the comparison
def compare_spiking(snet: SpikingNet, batches: Batches, ep: EPSection, options: CompareOptions,
                    total_batches: int | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Measure and price; write compare.json / compare.md / plots into `out_dir` when given."""
    timesteps = sorted({int(T) for T in options.timesteps})
    if not timesteps or timesteps[0] < 2:
        raise ConfigError(f"timesteps must be integers ≥ 2, got {options.timesteps}")
    profiles = [load_profile(p) for p in options.profiles]
    if not profiles:
        raise ConfigError("no energy profile given")
    T1 = ep.eval_free_steps or ep.free_steps
    first: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep_first(it: Batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in it:
            if sum(len(b[1]) for b in first) < options.probe_samples:
                first.append((x, y))
            yield x, y

    bar = tqdm(keep_first(batches), total=total_batches, desc="spiking eval", unit="batch",
               disable=not options.progress, file=sys.stderr, leave=False)
    result = evaluate_spiking(snet, bar, timesteps, analog_steps=T1, analog_tol=ep.eval_tol)
    if not distributed.current().is_main:  # under torchrun the other ranks only evaluate their parts of the data
        return result
    x_probe = torch.cat([b[0] for b in first])[: options.probe_samples]
    y_probe = torch.cat([b[1] for b in first])[: options.probe_samples]
    probe = SpikeProbe(snet)
    spiking_free_phase(snet, snet.net.prepare(x_probe), timesteps[-1], on_step=probe)

    spec = snet.spec
    analog_inf = analog_counts(spec, {"free": T1}, memory=options.memory)
    analog_train = analog_training_counts(spec, ep.free_steps, ep.nudge_steps, memory=options.memory)
    inference: dict[str, Counts] = {}
    training: dict[str, dict[str, Counts]] = {}
    from spiking_ep.learning import SpikingEPConfig

    for T in tqdm(timesteps, desc="training-step spikes", disable=not options.progress, file=sys.stderr, leave=False):
        row = result["timesteps"][str(T)]
        inference[str(T)] = spiking_counts(snet, {"free": (T, row["spikes_per_sample_by_layer"])},
                                           memory=options.memory)
        cfg = SpikingEPConfig(beta=ep.beta, free_steps=T, nudge_steps=max(T // 2, 1))
        training[str(T)] = spiking_training_counts(snet, x_probe, y_probe, cfg, memory=options.memory)
        row["mean_rate"] = inference[str(T)].mean_rate()
        row["synapses"] = inference[str(T)].synapses()
        row["spikes_per_synapse"] = inference[str(T)].spikes_per_synapse()
        row["literature"] = {"spikes_per_synapse": spikes_per_synapse_verdict(row["spikes_per_synapse"]),
                             "spike_rate": spike_rate_verdict(row["mean_rate"])}

    report: dict[str, Any] = {
        "format": 1,
        "run_dir": options.label,
        "command": options.command,
        "data": options.data,
        "samples": result["samples"],
        "memory": options.memory,
        "seed": {"training": options.data.get("seed"), "spiking": snet.attention.seed},
        "spiking_config": {**result["config"],
                           **({"attention_drift": snet.attention.drift} if snet.attention.holds_rows else {})},
        "network": {"name": spec.name, "layers": spec.layer_names, "spec": spec.to_dict()},
        "software": _versions(),
        "analog": {**result["analog"], "inference_steps": T1, "training_steps": {
            "free": ep.free_steps, "nudge": ep.nudge_steps, "beta": ep.beta}},
        "timesteps": result["timesteps"],
        "probe": {"samples": int(len(y_probe)), "steps": timesteps[-1], "firing_rates": probe.firing_rates()},
        "profiles": {},
        "counts": {"analog_inference": analog_inf.to_dict(),
                   "analog_training": {k: c.to_dict() for k, c in analog_train.items()},
                   "spiking_inference": {T: c.to_dict() for T, c in inference.items()},
                   "spiking_training": {T: {k: c.to_dict() for k, c in d.items()} for T, d in training.items()}},
        "caveats": list(CAVEATS),
    }
    for profile in profiles:
        report["profiles"][profile.name] = _price(profile, analog_inf, analog_train, inference, training)
    if out_dir is not None:
        write_report(report, out_dir, probe.raster_matrix() if options.plots else None, plots=options.plots)
    return report


def _price(profile: EnergyProfile, analog_inf: Counts, analog_train: dict[str, Counts],
           inference: dict[str, Counts], training: dict[str, dict[str, Counts]]) -> dict[str, Any]:
    out: dict[str, Any] = {"constants": profile.to_dict(), "inference": {}, "training": {}}
    for T, counts in inference.items():
        comp = compare(analog_inf, counts, profile)
        out["inference"][T] = {**comp.to_dict(),
                               "analog_by_layer_pj": analog_inf.energy_by(profile, "layer"),
                               "spiking_by_layer_pj": counts.energy_by(profile, "layer"),
                               "analog_by_kind_pj": analog_inf.energy_by(profile, "kind"),
                               "spiking_by_kind_pj": counts.energy_by(profile, "kind")}
        out["training"][T] = {
            est: {**compare(analog_train[est], c, profile).to_dict(),
                  "analog_by_phase_pj": analog_train[est].energy_by(profile, "phase"),
                  "spiking_by_phase_pj": c.energy_by(profile, "phase")}
            for est, c in training[T].items()}
    return out


def _versions() -> dict[str, str]:
    """analog_ep's software versions plus the spiking libraries' (from package metadata: no import needed)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = software_versions()
    for package in ("nir", "nirtorch", "norse", "snntorch"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def compare_run(run_dir: str | Path, snet: SpikingNet | None = None, split: str = "test", limit: int | None = None,
                batch_size: int = 128, options: CompareOptions | None = None,
                batches: Batches | None = None, total_batches: int | None = None) -> dict[str, Any]:
    """`compare_spiking` on a run directory: its checkpoint, spiking.json and data; files in RUN_DIR/compare."""
    from spiking_ep.convert import load_spiking

    options = options or CompareOptions()
    options.label = options.label or str(run_dir)
    snet = snet or load_spiking(run_dir)
    if batches is None:
        batches, total_batches, info = run_batches(run_dir, split, limit, batch_size, progress=options.progress)
        options.data = {**info, **options.data}
    with torch_threads(options.threads):
        return compare_spiking(snet, batches, ep_settings(run_dir), options, total_batches,
                               Path(run_dir) / "compare")
