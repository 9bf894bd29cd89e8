"""The figures of `seqep compare`, drawn from the report dict alone (so they can be redrawn from compare.json).

accuracy_vs_timesteps.png   spiking accuracy and agreement vs T, analog as a line (`plot_accuracy_vs_timesteps`)
energy_by_layer.png         energy per inference, stacked by layer: analog vs spiking at every T, per profile
firing_rates.png            histogram of per-unit firing rates, one panel per spiking layer (probe samples)
raster.png                  spikes of one sample over time, layers stacked (sigma-delta: red = negative)
pareto.png                  accuracy vs energy per inference over T, per profile, the Pareto front, analog points
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spiking_ep.energy.pricing import PJ_PER_UJ
from spiking_ep.evaluate import plot_accuracy_vs_timesteps


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return str(path)


def write_plots(report: dict[str, Any], raster: dict[str, list[list[float]]], out_dir: str | Path) -> dict[str, str]:
    out = Path(out_dir)
    paths = {"accuracy_vs_timesteps": str(plot_accuracy_vs_timesteps(
        {"timesteps": report["timesteps"], "config": report["spiking_config"], "analog": report["analog"]},
        report["analog"]["accuracy"], out / "accuracy_vs_timesteps.png",
        title=f"{report.get('run_dir') or 'spiking'}: accuracy vs timesteps (analog T₁ = "
              f"{report['analog']['inference_steps']})"))}
    paths["energy_by_layer"] = plot_energy_by_layer(report, out / "energy_by_layer.png")
    paths["firing_rates"] = plot_firing_rates(report, out / "firing_rates.png")
    if raster:
        paths["raster"] = plot_raster(raster, out / "raster.png")
    paths["pareto"] = plot_pareto(report, out / "pareto.png")
    return paths


def plot_energy_by_layer(report: dict[str, Any], path: Path) -> str:
    plt = _pyplot()
    profiles = report["profiles"]
    Ts = sorted(report["timesteps"], key=int)
    fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
    for ax, (name, prof) in zip(axes[0], profiles.items()):
        first = prof["inference"][Ts[0]]
        layers = list(first["analog_by_layer_pj"])
        bars = {"analog": first["analog_by_layer_pj"]}
        bars.update({f"T={T}": prof["inference"][T]["spiking_by_layer_pj"] for T in Ts})
        bottom = [0.0] * len(bars)
        for layer in layers:
            heights = [b[layer] / PJ_PER_UJ for b in bars.values()]
            ax.bar(list(bars), heights, bottom=bottom, label=layer)
            bottom = [a + h for a, h in zip(bottom, heights)]
        ax.set_ylabel("energy per inference (µJ)")
        ax.set_title(f"profile {name}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="layer")
    fig.suptitle("energy by layer: analog (T₁ steps) vs spiking (T steps)")
    return _save(fig, path)


def plot_firing_rates(report: dict[str, Any], path: Path) -> str:
    plt = _pyplot()
    rates = report["probe"]["firing_rates"]
    fig, axes = plt.subplots(1, max(len(rates), 1), figsize=(3.6 * max(len(rates), 1), 3.2), squeeze=False)
    for ax, (layer, values) in zip(axes[0], rates.items()):
        ax.hist(values, bins=30, color="tab:blue")
        ax.set_title(f"{layer} ({len(values)} units)")
        ax.set_xlabel("spikes / unit / step")
        ax.set_ylabel("units")
    probe = report["probe"]
    fig.suptitle(f"firing rates over T = {probe['steps']} steps, mean of {probe['samples']} samples")
    return _save(fig, path)


def plot_raster(raster: dict[str, list[list[float]]], path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    offset, ticks = 0, []
    points: dict[bool, tuple[list[int], list[int]]] = {True: ([], []), False: ([], [])}
    for layer, steps in raster.items():
        units = len(steps[0]) if steps else 0
        for t, row in enumerate(steps):
            for u, s in enumerate(row):
                if s:
                    points[s < 0][0].append(t)
                    points[s < 0][1].append(offset + u)
        ticks.append((offset + units / 2, layer))
        offset += units
        ax.axhline(offset - 0.5, color="0.7", lw=0.5)
    for negative, (ts, us) in points.items():
        ax.scatter(ts, us, marker="|", s=12, linewidths=0.6, color="tab:red" if negative else "k")
    ax.set_yticks([p for p, _ in ticks], [name for _, name in ticks])
    ax.set_xlabel("timestep")
    ax.set_ylim(-0.5, max(offset - 0.5, 0.5))
    ax.set_title("spikes of one sample (red: negative sigma-delta spikes)")
    return _save(fig, path)


def plot_pareto(report: dict[str, Any], path: Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    Ts = sorted(report["timesteps"], key=int)
    acc = [100 * report["timesteps"][T]["accuracy"] for T in Ts]
    drawn: set[float] = set()
    for i, (name, prof) in enumerate(report["profiles"].items()):
        color = f"C{i}"
        energy = [prof["inference"][T]["spiking_pj"] / PJ_PER_UJ for T in Ts]
        ax.plot(energy, acc, "o", color=color, label=f"spiking, {name}")
        for e, a, T in zip(energy, acc, Ts):
            ax.annotate(f"T={T}", (e, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto_front(list(zip(energy, acc)))
        ax.plot(*zip(*front), "-", color=color, lw=1)
        analog = prof["inference"][Ts[0]]["analog_pj"] / PJ_PER_UJ
        if analog not in drawn:  # profiles usually share the analog prices: one star
            drawn.add(analog)
            ax.plot(analog, 100 * report["analog"]["accuracy"], "*", color=color, ms=12,
                    label=f"analog, {name}" if len(report["profiles"]) == 1 else f"analog (T₁), {name} prices")
    ax.set_xscale("log")
    ax.set_xlabel("energy per inference (µJ)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("accuracy vs energy (Pareto front over T)")
    return _save(fig, path)


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by a cheaper-and-at-least-as-accurate one, by increasing energy."""
    front: list[tuple[float, float]] = []
    for e, a in sorted(points):
        if not front or a > front[-1][1]:
            front.append((e, a))
    return front
