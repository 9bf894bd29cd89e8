"""Spiking inference against the analog model: accuracy, agreement, spikes and convergence vs timesteps T.

One spiking free phase per batch runs to max(T); every requested T is read off the same run (the
dynamics do not depend on when you stop), so the curve costs one run, not one run per T.
Readout ("final"): the output layer's trace at step T; ("window"): its mean over steps (T/2, T].

Under torchrun (`analog_ep.train.distributed`) each rank evaluates its run of whole batches of the split
(`run_batches`, `shard_batches`) and `evaluate_spiking` sums the counts over the ranks: every rank gets the
whole split's numbers, those of one process. In one process both are no-ops.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from analog_ep.dynamics import free_phase
from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet, State
from analog_ep.train import distributed
from spiking_ep.convert import DEFAULT_CODING, SpikingNet, to_spiking
from spiking_ep.dynamics import SpikingState, init_state, new_record, spiking_step
from spiking_ep.units.neurons import SigmaDeltaCoding

READOUTS = ("final", "window")


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The training config of a run directory (RUN_DIR/config.json's "config" section), or {}."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    return cfg.get("config") or cfg


def batches_from_tensors(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]


def shard_batches(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's contiguous run of `batches` (all of them in one process): whole batches, as one process
    forms them (`distributed.whole_batches`)."""
    start, stop = distributed.shard_bounds(len(batches))
    return list(batches[start:stop])


def run_batches(run_dir: str | Path, split: str = "test", limit: int | None = None, batch_size: int = 128,
                seed: int = 0, progress: bool = False) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int, dict]:
    """Embedded (x, y) batches of a run's data split, exactly as the analog model saw them in training;
    their count; and a description of the data (of the whole split).

    With `limit`, a seeded random subset (kept in stored order): the stored splits are ordered by label,
    so "the first N" would be one class only. Under torchrun, this rank's run of whole batches of it.
    """
    from analog_ep.train.trainer import batches, load_run_data, seeded_subset

    with distributed.main_first():  # under torchrun rank 0 fills the data cache, the others read it
        cfg, task, embedding = load_run_data(run_dir, progress=progress)
    dataset = task.splits[split]
    index = seeded_subset(len(dataset), limit, seed)
    start, stop = distributed.whole_batches(len(index), batch_size)
    count = -(-(stop - start) // batch_size)
    # `batches` walks the whole split's length: stop after the batches `index` fills
    gen = islice(batches(dataset, embedding, batch_size, embedding.device, embedding.dtype, index[start:stop],
                         features=cfg.data.pair_features), count)
    info = {"task": cfg.data.task, "split": split, "samples": len(index), "split_size": len(dataset),
            "limit": limit, "subset_seed": seed if len(index) < len(dataset) else None,
            "source": task.info.get("source"), "vectors": cfg.data.vectors, "max_len": task.max_len,
            "seed": cfg.train.seed}
    return gen, count, info


def batches_from_run(run_dir: str | Path, split: str = "test", limit: int | None = None,
                     batch_size: int = 128, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Just the batches of `run_batches`."""
    return run_batches(run_dir, split, limit, batch_size, seed)[0]


class _Snapshots:
    """Traces at each requested T and their means over (T/2, T], collected during one run."""

    def __init__(self, timesteps: Sequence[int]) -> None:
        self.timesteps = sorted(set(timesteps))
        self.final: dict[int, State] = {}
        self.window_sum: dict[int, State] = {}

    def __call__(self, state: SpikingState) -> None:
        t = state.t
        for T in self.timesteps:
            if T // 2 < t <= T:
                acc = self.window_sum.get(T)
                if acc is None:
                    self.window_sum[T] = [tr.clone() for tr in state.traces]
                else:
                    for a, tr in zip(acc, state.traces):
                        a.add_(tr)
            if t == T:
                self.final[T] = [tr.clone() for tr in state.traces]

    def window(self, T: int) -> State:
        steps = T - T // 2
        return [a / steps for a in self.window_sum[T]]


@torch.no_grad()
def evaluate_spiking(
    net: EPNet | SpikingNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    timesteps: Sequence[int] = (32, 64, 128, 256),
    coding: str | None = None,
    readout: str = "final",
    analog_steps: int = 100,
    analog_tol: float | None = 1e-6,
    **options: Any,
) -> dict[str, Any]:
    """Per T: accuracy, agreement with the analog prediction, spikes per sample, firing rates, distance.

    `net`: an EPNet (converted with `coding` and `options`, see `to_spiking`) or a SpikingNet (then
    `coding`/`options` override its settings). `batches` yields (x, y), x embedded (B, S, L, d).
    The analog reference is the free phase run for up to `analog_steps` (early exit at `analog_tol`).
    Distances are mean |trace − analog state| per layer at step T; firing rates are spikes per unit
    and step over the first T steps (attention rows: winner events per row and step).

    Under torchrun every rank calls it with its part of the batches (possibly none) and gets the numbers of
    all of them (sums over the ranks).
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    if isinstance(net, SpikingNet):
        snet = net.with_options(**({"coding": coding} if coding else {}), **options) if (coding or options) else net
    else:
        snet = to_spiking(net, coding or DEFAULT_CODING, **options)
    epnet = snet.net
    timesteps = sorted({int(T) for T in timesteps})
    if not timesteps or timesteps[0] < 2:
        raise ValueError(f"timesteps must be integers ≥ 2, got {timesteps}")
    T_max = timesteps[-1]
    names = epnet.spec.layer_names
    # per T (rows): correct predictions, agreements with the analog prediction, summed distances per layer
    correct, agree = torch.zeros(len(timesteps), dtype=torch.float64), torch.zeros(len(timesteps), dtype=torch.float64)
    distance = torch.zeros(len(timesteps), len(names), dtype=torch.float64)
    analog_correct = samples = 0
    analog_residual = 0.0
    spikes_by_step = torch.zeros(T_max, len(names), dtype=torch.float64)
    record = new_record(snet, 0)
    for x, y in batches:
        inputs = epnet.prepare(x)
        y = y.to(epnet.weights[0].device)
        analog, trace = free_phase(epnet, inputs, analog_steps, tol=analog_tol)
        analog_residual = max(analog_residual, trace.final_residual)
        analog_pred = analog[-1].argmax(-1)
        analog_correct += int((analog_pred == y).sum())
        snaps = _Snapshots(timesteps)
        state = init_state(snet, inputs)
        for t in range(T_max):
            state, _, counts = spiking_step(snet, inputs, state)
            spikes_by_step[t] += torch.tensor(counts, dtype=torch.float64)
            snaps(state)
        for i, T in enumerate(timesteps):
            traces = snaps.final[T] if readout == "final" else snaps.window(T)
            pred = traces[-1].argmax(-1)
            correct[i] += int((pred == y).sum())
            agree[i] += int((pred == analog_pred).sum())
            for n, (s, a) in enumerate(zip(snaps.final[T], analog)):
                distance[i, n] += float((s - a).abs().flatten(1).mean(1).sum())
        samples += int(y.numel())
    # the whole split's numbers from every rank's part (in one process: these)
    samples, analog_correct = (int(v) for v in distributed.sum_over_ranks(samples, analog_correct))
    correct, agree, distance, spikes_by_step = (distributed.sum_tensor_over_ranks(t)
                                                for t in (correct, agree, distance, spikes_by_step))
    analog_residual = distributed.max_over_ranks(analog_residual)
    if not samples:
        raise ValueError("no batches to evaluate")
    record.samples = samples
    result: dict[str, Any] = {
        "config": {**snet.config(), "readout": readout, "analog_steps": analog_steps},
        "samples": samples,
        "layer_names": names,
        "analog": {"accuracy": analog_correct / samples, "max_final_residual": analog_residual},
        "cost_constants": {k: v for k, v in record.to_dict().items() if k in (
            "layer_units", "fan_out", "neuron_updates_per_step", "dense_macs_per_step", "dense_macs_per_sample",
            "softmax_exps_per_step")},
        "timesteps": {},
    }
    for i, T in enumerate(timesteps):
        by_layer = spikes_by_step[:T].sum(0) / samples
        fc = [n for n in range(len(names)) if not snet.is_attention_layer(n)]
        result["timesteps"][str(T)] = {
            "accuracy": float(correct[i]) / samples,
            "agreement": float(agree[i]) / samples,
            "spikes_per_sample": float(by_layer[fc].sum()),  # unit spikes (attention winner events apart)
            "spikes_per_sample_by_layer": dict(zip(names, by_layer.tolist())),
            "firing_rates": {n: float(v) / (u * T) for n, v, u in zip(names, by_layer, record.layer_units)},
            "distance_to_analog": dict(zip(names, (distance[i] / samples).tolist())),
            "synaptic_ops_per_sample": float((by_layer * torch.tensor(record.fan_out, dtype=torch.float64)).sum()),
            "dense_macs_per_sample": record.dense_macs_for(T, float(by_layer[0]) if record.dense_macs_per_event
                                                           else 0.0),
        }
    return result


def timesteps_for_gap(result: dict[str, Any], gap: float) -> int | None:
    """Smallest evaluated T whose accuracy is within `gap` (fraction, e.g. 0.005) of the analog accuracy."""
    analog = result["analog"]["accuracy"]
    for T in sorted(result["timesteps"], key=int):
        if result["timesteps"][T]["accuracy"] >= analog - gap:
            return int(T)
    return None


def _label(cfg: dict[str, Any]) -> str:
    if cfg["coding"] == "sigma_delta":
        theta = cfg.get("coding_options", {}).get("threshold", SigmaDeltaCoding.threshold)
        unit = f"sigma_delta θ=1/{round(1 / theta)}"
    else:
        unit = f"{cfg['coding']} τ={cfg['tau']:g}" if cfg["tau"] is not None else f"{cfg['coding']} τ=∞"
    return f"{unit}, {cfg['attention']}"


def plot_accuracy_vs_timesteps(result: dict[str, Any] | Sequence[dict[str, Any]], analog_accuracy: float | None,
                               path: str | Path, title: str | None = None) -> Path:
    """Left: spiking accuracy vs T (log axis) against the analog line; right: agreement with analog."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [result] if isinstance(result, dict) else list(result)
    if analog_accuracy is None:
        analog_accuracy = results[0]["analog"]["accuracy"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for res in results:
        Ts = sorted(res["timesteps"], key=int)
        label = _label(res["config"])
        ax.plot([int(T) for T in Ts], [100 * res["timesteps"][T]["accuracy"] for T in Ts], "o-", label=label)
        ax2.plot([int(T) for T in Ts], [100 * res["timesteps"][T]["agreement"] for T in Ts], "o-", label=label)
    ax.axhline(100 * analog_accuracy, color="k", ls="--", lw=1, label="analog")
    for a, name in ((ax, "accuracy (%)"), (ax2, "agreement with analog (%)")):
        a.set_xscale("log", base=2)
        a.set_xlabel("timesteps T")
        a.set_ylabel(name)
        a.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title or "spiking vs analog")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
