"""The files of `seqep compare`: compare.json, the paste-ready compare.md, the console table and the demo's headline.

Everything here reads the report dict that `compare.compare_spiking` builds; nothing is measured again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analog_ep.errors import ConfigError
from analog_ep.train.run_dir import write_json
from spiking_ep.energy.literature import DAMPFHOFFER, YAN, verdict_text
from spiking_ep.energy.pricing import PJ_PER_UJ


def write_report(report: dict[str, Any], out_dir: str | Path, raster: dict[str, Any] | None,
                 plots: bool = True) -> dict[str, str]:
    """compare.json, compare.md and (optionally) the plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = {}
    if plots:
        from spiking_ep.energy.plots import write_plots

        paths = write_plots(report, raster or {}, out / "plots")
    report["plots"] = paths
    write_json(out / "compare.json", report)
    (out / "compare.md").write_text(markdown(report))
    return paths


def _uj(pj: float) -> str:
    return f"{pj / PJ_PER_UJ:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def markdown(report: dict[str, Any]) -> str:
    """The paste-ready report: accuracy/spikes table, energy per inference and per training sample, constants."""
    cfg, analog, data = report["spiking_config"], report["analog"], report["data"]
    Ts = sorted(report["timesteps"], key=int)
    lines = [f"# Analog vs spiking: {report.get('run_dir') or data.get('task', '')}", ""]
    lines += [f"- command: `{report['command'] or 'spiking_ep.energy.compare (Python API)'}`",
              f"- data: {_data_text(data)}, {report['samples']} samples"
              + (f" (first {data['samples']} of {data['split_size']})" if "split_size" in data else "")
              + f"; seeds: training {report['seed']['training']}, spiking {report['seed']['spiking']}",
              f"- spiking units: {_coding(cfg)}; readout: output trace at step T",
              f"- analog: T₁ = {analog['inference_steps']} relaxation steps per inference; training "
              f"T₁ + K + K = {analog['training_steps']['free']} + {analog['training_steps']['nudge']} + "
              f"{analog['training_steps']['nudge']} (β = {analog['training_steps']['beta']})",
              "- software: " + ", ".join(f"{k} {v}" for k, v in report["software"].items()
                                          if k not in ("platform", "processor")), ""]
    lines += ["## Accuracy and spikes", "",
              "| network | T | accuracy | agreement with analog | spikes / sample | mean rate (spikes / unit / step) |",
              "|---|---|---|---|---|---|",
              f"| analog | {analog['inference_steps']} | {_pct(analog['accuracy'])} | — | — | — |"]
    for T in Ts:
        r = report["timesteps"][T]
        lines.append(f"| spiking | {T} | {_pct(r['accuracy'])} | {_pct(r['agreement'])} | "
                     f"{r['spikes_per_sample']:.4g} | {r['mean_rate']:.3g} |")
    if "attention_drift" in cfg:
        first = report["network"]["layers"][0]
        events = ", ".join(f"T = {T}: {report['timesteps'][T]['spikes_per_sample_by_layer'][first]:.3g}" for T in Ts)
        lines += ["", f"Attention events per inference (recomputes of the rows, each priced as dense work): {events}."]
    lines += _literature_section(report, Ts)
    for name, prof in report["profiles"].items():
        lines += ["", f"## Energy per inference, profile `{name}` (µJ per sample)", "",
                  "| T | analog | spiking | analog / spiking | spiking, fixed part | mean rate | break-even rate "
                  "| verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for T in Ts:
            c = prof["inference"][T]
            lines.append(f"| {T} | {_uj(c['analog_pj'])} | {_uj(c['spiking_pj'])} | "
                         f"{c['ratio_analog_over_spiking']:.3g} | {_uj(c['fixed_pj'])} | {c['mean_rate']:.3g} | "
                         f"{c['break_even_rate']:.3g} | {c['verdict'].split(':')[0]} |")
        unpriced = sorted({k for c in prof["inference"].values() for k in c.get("unpriced", [])})
        if unpriced:
            reads = {b: report["counts"][f"{b}_inference"] for b in ("analog", "spiking")}
            lines += ["", f"Weight reads counted but **not priced** by `{name}` ({', '.join(unpriced)}: no cited "
                      "constant): analog " + f"{reads['analog']['totals'].get('weight_read', 0):.4g}, spiking "
                      + ", ".join(f"T = {T}: {reads['spiking'][T]['totals'].get('weight_read', 0):.4g}" for T in Ts)
                      + " per inference. Give `weight_read` with its source in a profile file to price them."]
        elif report.get("memory"):
            lines += ["", f"Weight reads priced: analog.weight_read {prof['constants']['analog']['weight_read']:g} pJ,"
                      f" spiking.weight_read {prof['constants']['spiking']['weight_read']:g} pJ."]
        lines += ["", f"## Energy per training sample, profile `{name}` (µJ per sample)", "",
                  "| T (free / nudge) | estimator | analog | spiking | analog / spiking | mean rate "
                  "| break-even rate | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for T in Ts:
            for est, c in prof["training"][T].items():
                lines.append(f"| {T} / {max(int(T) // 2, 1)} | {est} | {_uj(c['analog_pj'])} | "
                             f"{_uj(c['spiking_pj'])} | {c['ratio_analog_over_spiking']:.3g} | {c['mean_rate']:.3g} | "
                             f"{c['break_even_rate']:.3g} | {c['verdict'].split(':')[0]} |")
        T = Ts[-1]
        c = prof["inference"][T]
        lines += ["", f"Where the energy of one inference goes at T = {T} (µJ):", "",
                  "| | " + " | ".join(c["analog_by_layer_pj"]) + " |",
                  "|---" * (len(c["analog_by_layer_pj"]) + 1) + "|",
                  "| analog | " + " | ".join(_uj(v) for v in c["analog_by_layer_pj"].values()) + " |",
                  "| spiking | " + " | ".join(_uj(v) for v in c["spiking_by_layer_pj"].values()) + " |", "",
                  "by operation: analog " + ", ".join(f"{k} {_uj(v)}" for k, v in c["analog_by_kind_pj"].items() if v)
                  + "; spiking " + ", ".join(f"{k} {_uj(v)}" for k, v in c["spiking_by_kind_pj"].items() if v), ""]
        lines += [f"Constants of `{name}` ({prof['constants']['description']}):", "",
                  "| constant | pJ | source |", "|---|---|---|"]
        for backend in ("analog", "spiking"):
            for kind, value in prof["constants"][backend].items():
                key = f"{backend}.{kind}"
                lines.append(f"| {key} | {value:g} | {prof['constants']['sources'].get(key, 'not given')} |")
    lines += ["", "## Conventions and caveats", "",
              "Break-even rate ρ* = (E_analog − E_fixed) / (N · c̄): N spiking unit-steps, c̄ the mean price of a "
              "spike (fan-out × sop + spike_generation); spiking pays off while the mean rate is below ρ*; "
              "ρ* ≤ 0: never (docs/energy.md).", ""]
    lines += [f"- {c}" for c in report["caveats"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"- {k}: `{v}`" for k, v in report["plots"].items()]
    return "\n".join(lines) + "\n"


def _literature_section(report: dict[str, Any], Ts: list[str]) -> list[str]:
    """Spikes per synapse per inference and the spike rate against the published break-even points."""
    rows = [report["timesteps"][T] for T in Ts]
    if not all("literature" in r for r in rows):
        return []
    synapses = rows[0]["synapses"]
    lines = ["", "## Against published break-even points", "",
             f"Synapse: one directed, spike-driven weight connection ({synapses:,.0f} in this network: every "
             "symmetric weight between spiking layers counts twice, bottom-up and top-down, the first FC layer's "
             "top-down query synapses included; the attention scores and value path carry real values and are "
             "priced as dense MACs, not counted). Spikes per synapse per inference = synaptic operations / "
             "synapses; sigma-delta spikes of n quanta count n. Spike rate = spikes per spiking unit and step.",
             "", f"| T | spikes / synapse / inference | vs {DAMPFHOFFER} | spike rate | vs {YAN} |",
             "|---|---|---|---|---|"]
    for T, r in zip(Ts, rows):
        lit = r["literature"]
        lines.append(f"| {T} | {r['spikes_per_synapse']:.3g} | {verdict_text(lit['spikes_per_synapse'])} | "
                     f"{_pct(r['mean_rate'])} | {verdict_text(lit['spike_rate'])} |")
    lines += ["", "Below the Dampfhoffer range an SNN beat the ANN on the same silicon in every architecture they "
              "studied, within it in some, above it in none; the Yan threshold is against a ⌈log₂(T+1)⌉-bit ANN "
              "at T = 5. Both studies count memory accesses, which the energy tables below do not by default."]
    return lines


def _data_text(data: dict[str, Any]) -> str:
    if "task" in data:
        return f"{data['task']} {data['split']} split ({data.get('vectors')}, L = {data.get('max_len')})"
    return str(data.get("source", "batches given to spiking_ep.energy.compare"))


def _coding(cfg: dict[str, Any]) -> str:
    if cfg["coding"] == "sigma_delta":
        theta = cfg.get("coding_options", {}).get("threshold", 1 / 32)
        unit = f"sigma-delta, θ = 1/{round(1 / theta)}"
    else:
        unit = f"{cfg['coding']}, τ = {cfg['tau']}"
    drift = (f" (recompute at an L1 drift of fc1's trace ≥ {cfg['attention_drift']:g})"
             if "attention_drift" in cfg else "")
    return f"{unit}, attention {cfg['attention']}{drift}"


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the final table: analog vs spiking accuracy, spikes, energy per inference and ratio."""
    first = next(iter(report["timesteps"]))
    rows = {T: {"accuracy": r["accuracy"], "agreement": r["agreement"], "spikes_per_sample": r["spikes_per_sample"],
                "mean_rate": r.get("mean_rate"), "spikes_per_synapse": r.get("spikes_per_synapse"),
                "energy_uj": {p: v["inference"][T]["spiking_pj"] / PJ_PER_UJ for p, v in report["profiles"].items()},
                "ratio": {p: v["inference"][T]["ratio_analog_over_spiking"] for p, v in report["profiles"].items()}}
            for T, r in report["timesteps"].items()}
    run_dir = report.get("run_dir") or "."
    return {"samples": report["samples"], "analog_accuracy": report["analog"]["accuracy"],
            "analog_steps": report["analog"]["inference_steps"],
            "analog_energy_uj": {p: v["inference"][first]["analog_pj"] / PJ_PER_UJ
                                 for p, v in report["profiles"].items()},
            "timesteps": rows, "markdown": str(Path(run_dir) / "compare" / "compare.md"),
            "plots": report.get("plots", {})}


def console_table(report_or_headline: dict[str, Any]) -> str:
    """Analog vs spiking per T: accuracy, agreement, spikes/sample, energy per inference and analog/spiking."""
    h = report_or_headline if "analog_energy_uj" in report_or_headline else headline(report_or_headline)
    profiles = list(h["analog_energy_uj"])
    head = f"{'':20}{'accuracy':>9} {'agreement':>10} {'spikes/sample':>14}"
    head += "".join(f" {p + ' µJ':>13} {'analog/spk':>10}" for p in profiles)
    lines = [f"{h['samples']} test samples; energy per inference; analog/spk > 1: the spiking network is cheaper",
             head]
    row = f"{'analog, T₁ = ' + str(h['analog_steps']):20}{100 * h['analog_accuracy']:>8.2f}% {'—':>10} {'—':>14}"
    lines.append(row + "".join(f" {h['analog_energy_uj'][p]:>13.3g} {'1':>10}" for p in profiles))
    for T, r in h["timesteps"].items():
        row = f"{'spiking, T = ' + T:20}{100 * r['accuracy']:>8.2f}% {100 * r['agreement']:>9.2f}% " \
              f"{r['spikes_per_sample']:>14.0f}"
        lines.append(row + "".join(f" {r['energy_uj'][p]:>13.3g} {r['ratio'][p]:>10.3g}" for p in profiles))
    lines.append(f"report: {h['markdown']}")
    if h["plots"]:
        lines.append(f"plots:  {Path(next(iter(h['plots'].values()))).parent}/ "
                     f"({', '.join(Path(p).name for p in h['plots'].values())})")
    return "\n".join(lines)


def load_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "compare" / "compare.json"
    if not path.is_file():
        raise ConfigError(f"no {path}: run `seqep compare {run_dir}` first")
    return json.loads(path.read_text())
