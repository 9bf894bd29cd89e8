"""One measurement job (a JSON-able dict) run in this process or in a fresh one, so that a mode's peak
resident memory is its own. `python -m analog_ep.bench '<job json>'` is the fresh process's entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from analog_ep.bench.accuracy import compare_training
from analog_ep.bench.fidelity import check_fidelity
from analog_ep.bench.machine import matmul_peak
from analog_ep.bench.shapes import build_shape
from analog_ep.bench.timing import WARMUP_BATCHES, run_inference, run_reference, run_train
from analog_ep.estimators import EPConfig
from analog_ep.fast.allocator import keep_freed_memory
from analog_ep.fast.retrieval import enable_fused_fp32
from analog_ep.phi import enable_compiled_kernels


def worker(job: dict) -> dict:
    """One measurement, in this process: job = {kind, shape, batch, precision, tol, nudge_tol, ...}."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job.get("keep_memory", True):
        keep_freed_memory()
    if job.get("compile"):
        enable_compiled_kernels(True)
    elif job.get("precision", "fp32") == "fp32" and job.get("kind") != "reference":
        enable_fused_fp32()  # what `seqep train` runs on the exact path (our AVX2 kernel; nothing compiled)
    shape = build_shape(job["shape"])
    cfg = EPConfig(shape.beta, shape.free_steps, shape.nudge_steps, tol=job.get("tol"),
                   precision=job.get("precision", "fp32"), nudge_tol=job.get("nudge_tol"), fold=job.get("fold", False))
    kind, batch, repeats = job["kind"], int(job["batch"]), int(job.get("repeats", 1))
    warmup, inputs = int(job.get("warmup", WARMUP_BATCHES)), job.get("inputs", "random")
    with torch.no_grad():
        if kind == "train":
            return run_train(shape, batch, cfg, repeats, fused_adam=job.get("fused_adam", True), warmup=warmup,
                             inputs=inputs)
        if kind == "reference":
            return run_reference(shape, batch, repeats, warmup, inputs)
        if kind == "inference":
            return run_inference(shape, batch, cfg, repeats, warmup, inputs)
        if kind == "fidelity":
            return check_fidelity(shape, batch, cfg, inputs=inputs)
        if kind == "accuracy":
            return compare_training(job["shape"], job.get("train_limit"), int(job.get("epochs", 1)),
                                    job.get("data_dir"), job.get("tol"))
        if kind == "peaks":
            sizes = tuple(job.get("peak_sizes") or (2048, 4096))
            dtypes = job.get("peak_dtypes") or ["fp32", "bf16"]
            return {name: matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[name], sizes) for name in dtypes}
    raise ValueError(f"unknown job kind {kind!r}")


def run_job(job: dict, subprocess_: bool = True) -> dict:
    """Run a worker job in a fresh Python process (clean peak RSS, no cross-talk), or in this one."""
    if not subprocess_:
        return worker(job)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "analog_ep.bench", json.dumps(job)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
