"""The benchmark driver: the jobs of each shape and batch size, assembled into the JSON report
(docs/benchmarks.md describes its fields), and that report as a table."""

from __future__ import annotations

import time
from typing import Any

import torch

from analog_ep.bench.flops import FLOP_FORMULA, count_flops
from analog_ep.bench.jobs import run_job
from analog_ep.bench.load import foreign_load, wait_for_idle
from analog_ep.bench.machine import machine_info
from analog_ep.bench.shapes import INPUT_RMS, Shape, build_shape, resolve_inputs
from analog_ep.bench.timing import WARMUP_BATCHES
from analog_ep.fast.folded import resolve_fold
from analog_ep.fast.lowp_weights import int8_kernel_name, lowp_dtype
from analog_ep.fast.precision import REQUESTS, resolve_precision


def bench(
    shapes: list[str],
    batch: int | None = None,
    precision: str = "auto",
    fold_keys: str = "auto",
    early_exit: bool = False,
    tol: float | None = None,
    inputs: str = "auto",
    reference: bool = True,
    inference: bool = True,
    fidelity: bool = False,
    fidelity_batch: int = 4,
    repeats: int = 1,
    warmup: int = WARMUP_BATCHES,
    threads: int | None = None,
    compile_kernels: bool = True,
    subprocesses: bool = True,
    wait_idle: float | None = None,
    wait_timeout: float = 1800.0,
    peak_sizes: tuple[int, ...] = (2048, 4096),
    idle_sample_s: float = 2.0,
    log=None,
    on_result=None,
) -> dict:
    """Run the benchmark; returns the JSON-able report (see docs/benchmarks.md for the fields)."""
    if precision not in REQUESTS:
        raise ValueError(f"precision must be one of {REQUESTS}")
    # once per shape, before any measurement: a shape that cannot take the inputs fails now, not midway; the
    # precision resolved on this machine (auto: calibrated; int8 without the AMX kernels: refused)
    inputs_of = {name: resolve_inputs(inputs, name) for name in shapes}
    resolved = {name: resolve_precision(precision, build_shape(name).spec, fold_keys=fold_keys) for name in shapes}
    modes = {mode for mode, _ in resolved.values()}
    folds: dict[tuple[str, int], tuple[bool, str]] = {}

    def fold_of(name: str, b: int) -> tuple[bool, str]:
        """Whether the fast path folds the first synapse onto the keys (`ep.fold_keys`) at this shape and batch."""
        if (name, b) not in folds:
            folds[name, b] = resolve_fold(fold_keys, build_shape(name).spec, resolved[name][0], "ep_symmetric", b)
        return folds[name, b]

    def note(msg: str) -> None:
        if log:
            log(msg)

    for name, (_, reason) in resolved.items():
        note(f"precision {name}: {reason}")

    def job(kind: str, shape: Shape, b: int, **extra) -> dict:
        if wait_idle is not None:
            wait_for_idle(wait_idle, wait_timeout, note)
        mode = resolved[shape.name][0]
        spec = dict(kind=kind, shape=shape.name, batch=b, repeats=repeats, warmup=warmup, threads=threads,
                    compile=compile_kernels and mode != "fp32", precision=mode,
                    inputs=inputs_of[shape.name], fold=fold_of(shape.name, b)[0] if b else False)
        spec.update(extra)
        if early_exit:
            spec.update(tol=tol if tol is not None else shape.tol, nudge_tol=tol if tol is not None else shape.tol)
        note(f"{kind:<10} {shape.name} batch {b} ...")
        t = time.perf_counter()
        out = run_job(spec, subprocesses)
        note(f"{kind:<10} {shape.name} batch {b}: {time.perf_counter() - t:.1f} s wall")
        return out

    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"precision": precision, "fold_keys": fold_keys, "early_exit": early_exit, "tol": tol,
                     "reference": reference,
                     "repeats": repeats, "warmup": warmup, "threads": threads or torch.get_num_threads(),
                     "compiled_kernels": compile_kernels and modes != {"fp32"}, "input_rms": INPUT_RMS,
                     "inputs": inputs, "int8_kernel": int8_kernel_name() if "int8" in modes else None},
        "flop_formula": FLOP_FORMULA,
        "foreign_cores_before": round(foreign_load(idle_sample_s), 3) if idle_sample_s > 0 else None,
    }
    # fractions are of the fp32 peak on the exact path, else of the bf16 peak (also for int8: its products
    # run on int8 but the attention and every other product of the step stay bf16), except for int8 where bf16 is
    # emulated: its other products are fp32 there (`lowp_weights.lowp_dtype`)
    fp32_companions = modes <= {"fp32", "int8"} and lowp_dtype() == torch.float32
    basis = "fp32" if modes == {"fp32"} or fp32_companions else "bf16"

    def measure_peaks() -> float:
        """Peaks measured again, the best of all measurements kept (a slow moment of a shared machine must not
        lower the peak and so raise every fraction); returns the basis peak."""
        # an fp32 basis needs the fp32 peak alone: bf16 peaks take minutes where bf16 is emulated (AVX2 CPUs)
        dtypes = ["fp32"] if basis == "fp32" else ["fp32", "bf16"]
        got = job("peaks", build_shape(shapes[0]), 0, peak_sizes=list(peak_sizes), peak_dtypes=dtypes)
        old = report.get("peaks", {"measured": []})
        measured = old["measured"] + [{**{f"{d}_gflops": got[d]["gflops"] for d in dtypes},
                                       "by_size": {d: got[d]["by_size"] for d in dtypes}}]
        report["peaks"] = {f"{d}_gflops": max(m[f"{d}_gflops"] for m in measured) for d in ("fp32", "bf16")
                           if d in dtypes}
        report["peaks"].update(by_size=measured[-1]["by_size"], basis=basis, measured=measured)
        return report["peaks"][f"{basis}_gflops"]

    def set_fractions(rec: dict, peak: float) -> None:
        rec["peak_fraction"] = rec["gflops"] / peak
        rec["relax_peak_fraction"] = rec["relax_gflops"] / peak if rec["relax_gflops"] else None

    peak = measure_peaks()  # before the measurements, and again after them
    results: list[dict] = []
    report["results"] = results
    for name in shapes:
        shape = build_shape(name)
        for i, b in enumerate([batch] if batch else list(shape.batches)):
            rec: dict[str, Any] = {
                "shape": name, "batch": b, "spec": shape.spec.to_dict(), "inputs": inputs_of[name],
                "precision": resolved[name][0], "precision_reason": resolved[name][1],
                "fold_keys": fold_of(name, b)[0], "fold_keys_reason": fold_of(name, b)[1],
                "ep": {"beta": shape.beta, "free_steps": shape.free_steps, "nudge_steps": shape.nudge_steps,
                       "tol": (tol or shape.tol) if early_exit else None},
            }
            flops = count_flops(shape.spec, b, shape.free_steps, shape.nudge_steps)
            fast = job("train", shape, b)
            ph = fast["phases"]
            executed = count_flops(shape.spec, b, ph["free_steps"], ph["nudge_steps"], fast["key_fraction"],
                                   fast.get("change_products"))
            relax_s = ph["free_s"] + ph["nudge_s"]
            rec.update(
                seconds_per_batch=fast["seconds_per_batch"], phases=ph, free_residual=fast["free_residual"],
                flops=flops["total"], flops_executed=executed["total"],
                gflops=executed["total"] / fast["seconds_per_batch"] / 1e9,
                relax_gflops=(executed["free"] + executed["nudge"]) / relax_s / 1e9 if relax_s > 0 else None,
                peak_rss_mb=fast["peak_rss_mb"], load=fast["load"], all_seconds=fast["all_seconds"],
                key_fraction=fast["key_fraction"],
            )
            if fast.get("change_products"):  # shares of the dense work the int8 change products did
                rec["change_products"] = fast["change_products"]
            if rec["fold_keys"]:  # the executed count is the plain relaxation's: GFLOP/s are effective ones
                rec["gflops_basis"] = "effective: the plain relaxation's FLOPs over the folded path's seconds"
            set_fractions(rec, peak)
            if inference:
                rec["inference"] = job("inference", shape, b)
            if reference:
                ref = job("reference", shape, b, precision="fp32")
                rec["reference"] = ref
                rec["speedup_vs_reference"] = ref["seconds_per_batch"] / rec["seconds_per_batch"]
                rec["rss_vs_reference"] = rec["peak_rss_mb"] / ref["peak_rss_mb"]
            if fidelity and i == 0:  # once per shape: it does not depend on the timed batch size
                rec["fidelity"] = job("fidelity", shape, fidelity_batch)
            results.append(rec)
            if on_result:
                on_result(report)  # partial report after each shape and batch (long runs can be cut short)
    peak = measure_peaks()
    for rec in results:
        set_fractions(rec, peak)
    return report


def summary_table(report: dict) -> str:
    """A human-readable table of a bench report."""
    peaks = ", ".join(f"{d} {report['peaks'][f'{d}_gflops']:.0f} GFLOP/s" for d in ("fp32", "bf16")
                      if f"{d}_gflops" in report["peaks"])
    settings = report["settings"]
    lines = [f"peaks: {peaks}; precision {settings['precision']}, early exit {settings['early_exit']}",
             f"{'shape':<12}{'batch':>6}{'s/batch':>9}{'ref s':>8}{'speedup':>8}{'GFLOP/s':>9}{'peak%':>7}"
             f"{'relax%':>7}{'steps':>8}{'RSS MB':>8}{'ref MB':>8}{'infer/s':>9}{'angle':>7}{'other':>6}"]
    for r in report["results"]:
        ref = r.get("reference", {})
        fid = r.get("fidelity", {})
        lines.append(
            f"{r['shape']:<12}{r['batch']:>6}{r['seconds_per_batch']:>9.2f}"
            f"{ref.get('seconds_per_batch', float('nan')):>8.1f}{r.get('speedup_vs_reference', float('nan')):>8.1f}"
            f"{r['gflops']:>9.0f}{100 * r['peak_fraction']:>7.0f}{100 * (r['relax_peak_fraction'] or 0):>7.0f}"
            f"{r['phases']['free_steps']:>4}+{r['phases']['nudge_steps']:<3}{r['peak_rss_mb']:>8.0f}"
            f"{ref.get('peak_rss_mb', float('nan')):>8.0f}"
            f"{r.get('inference', {}).get('samples_per_s', float('nan')):>9.0f}"
            f"{fid.get('angle_deg', float('nan')):>7.2f}{r['load']['foreign_cores']:>6.2f}")
    lines += [f"precision {r['shape']}: {r['precision_reason']}" for r in report["results"] if "precision_reason" in r]
    return "\n".join(lines)
