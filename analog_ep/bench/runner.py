"""`seqep bench`: how fast is one EP training batch, against the paper's way of running it and the hardware.

For each named shape and batch size this measures, each in a fresh subprocess (so that the peak resident
memory belongs to one mode alone):

- **fast path**: one full symmetric-EP training batch (free phase, ±β nudged phases as one doubled batch,
  ∂Φ/∂θ contrast, Adam step) through `analog_ep.estimators.ep_symmetric`, with the chosen precision
  (`fp32`: the exact path; `bf16`: large products on bf16 operands, `phi.LowPrecision`) and early exit;
- **reference-equivalent mode**: the published algorithm as the paper's code runs it
  (`analog_ep.reference.reference_ep_symmetric`: autograd on Φ at every step, synchronous updates,
  float32, +β then −β one after the other), same network, same batch, same Adam step;
- **inference**: free phase only (prediction), samples per second.

FLOPs are counted analytically (`count_flops`, matmul FLOPs of the algorithm, 2 per multiply-add) and set
against this machine's fp32 and bf16 matmul peaks, measured in the same run on large square products.

Inputs (`--inputs`): "real" takes a seeded batch of the task's training split, embedded as training embeds
it (the preset's vectors, length and normalisation; needs the data, `SEQEP_DATA_DIR`); "random" is Gaussian
(RMS 0.6 per entry). Speed depends on the data in two ways: early exit, and the fast path's retrieval
over distinct keys (`fast_retrieval`), which skips repeated words and padding. Random vectors never
repeat: on them the fast path does the full L × L retrieval, the worst case. "auto" (default) is real
where the shape's data is found, else random; every record says which it used.

Timings taken while other processes use the CPU are meaningless on a 2-core machine: every record carries
the load average and the CPU time other processes used while it ran (`foreign_cores`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from analog_ep import dynamics, estimators
from analog_ep.errors import ConfigError, DataError
from analog_ep.estimators import EPConfig, ep_symmetric, make_estimator
from analog_ep.fast import native_kernels
from analog_ep.fast.allocator import keep_freed_memory
from analog_ep.fast.lowp_weights import int8_kernel_name
from analog_ep.fast.retrieval import kept_fraction
from analog_ep.gdu import angle_deg
from analog_ep.models import build_spec
from analog_ep.phi import PRECISIONS, EPNet, GraphSpec, enable_compiled_kernels
from analog_ep.train.config import load_preset
from analog_ep.train.inner_loop import layer_param_groups, train_step

PAPER_SHAPES = ("imdb-paper", "snli-paper")
CPU_SHAPES = ("imdb-cpu", "snli-cpu")
TEST_SHAPES = ("imdb-tiny", "snli-tiny")  # seconds-sized, for tests and smoke checks
SHAPES = PAPER_SHAPES + CPU_SHAPES + TEST_SHAPES
DEFAULT_BATCHES = {"imdb-paper": (32, 128), "snli-paper": (256,)}  # others: the preset's batch size
DEFAULT_TOL = 1e-4  # early-exit residual tolerance where the preset sets none
INPUT_RMS = 0.6
WARMUP_BATCHES = 2  # untimed full batches before timing, in every mode (compile, oneDNN primitives, heap)
INPUTS = ("auto", "real", "random")

FLOP_FORMULA = (
    "per sample and relaxation step: Σ_k 2·m_k·2·a_k·o_k over FC synapses k (a_k inputs, o_k outputs; "
    "m_k = 2 products, bottom-up and top-down, or 1 when the synapse reads the constant input) "
    "+ 4·P·Lq·Lk·d·κ for the Hopfield retrievals (scores QKᵀ and softmax·V; P projections; κ = key_fraction, "
    "the share of the Lk keys the fast path multiplies, fast_retrieval: 1 in `flops`, the algorithm's count, "
    "and for the reference; < 1 in `flops_executed` where real inputs repeat words). "
    "Per batch: B·prep + B·T1·step + 2B·K·step + 2B·grad, with prep = 2·P·L·d² (X W0ᵀ, once per batch) "
    "and grad = Σ_k 2·a_k·o_k + 2·P·Lq·d² (∂Φ/∂θ on the 2B stacked nudged states). Softmax, activations, "
    "the optimizer step and the fast path's one-off s*-products are not counted."
)


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    name: str
    spec: GraphSpec
    beta: float
    free_steps: int
    nudge_steps: int
    tol: float | None  # the early-exit tolerance of this shape (used unless --no-early-exit)
    batches: tuple[int, ...]
    lrs: tuple[float, ...]


def vectors_dim(vectors: str) -> int:
    """Word-vector size from a preset's `data.vectors` (glove50 → 50, w2v:300 → 300, *-300 → 300)."""
    m = re.match(r"w2v:(\d+)", vectors) or re.search(r"(\d+)d?$", vectors)
    if not m:
        raise ValueError(f"cannot tell the dimension of vectors {vectors!r}")
    return int(m.group(1))


def build_shape(name: str) -> Shape:
    """A named benchmark shape: the paper and CPU presets (experiments/presets), or a tiny test shape."""
    if name in TEST_SHAPES:
        task = name.split("-")[0]
        beta, free, nudge = (0.1, 50, 25) if task == "imdb" else (0.5, 60, 30)
        spec = build_spec(task, tiny=True, bias_offset=1.0, schedule="synchronous")
        return Shape(name, spec, beta, free, nudge, DEFAULT_TOL, (8,), (1e-3,))
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    task, preset = name.split("-")
    cfg = load_preset(task, preset)
    m = cfg.model
    options: dict[str, Any] = dict(
        seq_len=cfg.data.max_len or (600 if task == "imdb" else 25),
        dim=vectors_dim(cfg.data.vectors) + cfg.data.extra_channels,
        hidden=tuple(m.hidden), attention=m.attention, mask_padding=m.mask_padding, pool_queries=m.pool_queries,
        bias_offset=m.bias_offset, init_gain=m.init_gain, schedule=m.schedule,
    )
    if m.gamma is not None:
        options["gamma"] = m.gamma
    if isinstance(getattr(m, "input_scale", None), float):
        options["input_scale"] = m.input_scale
    spec = replace(build_spec(task, **options), name=name)
    tol = cfg.ep.tol if cfg.ep.tol is not None else DEFAULT_TOL
    batches = DEFAULT_BATCHES.get(name, (cfg.train.batch_size,))
    return Shape(name, spec, cfg.ep.beta, cfg.ep.free_steps, cfg.ep.nudge_steps, tol, batches, tuple(cfg.train.lrs))


def random_batch(spec: GraphSpec, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g) * INPUT_RMS
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return x, y


def _preset_config(shape_name: str):
    """The preset a shape is built from (its data settings: where `--inputs real` reads)."""
    return load_preset(*shape_name.split("-"))


def real_data_available(shape_name: str) -> bool:
    """Whether `--inputs real` can run for this shape here (a preset shape whose task data is found)."""
    from analog_ep.data.sources import get_spec, locate_local_files, resolve_data_dir

    if shape_name in TEST_SHAPES:
        return False
    cfg = _preset_config(shape_name)
    data_dir = resolve_data_dir(cfg.data.data_dir)
    if data_dir is None:
        return False
    try:
        return bool(locate_local_files(get_spec(cfg.data.task), data_dir))
    except DataError:  # a missing or malformed layout: the loader says what is wrong, at `--inputs real`
        return False


def real_batch(shape: Shape, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of the task's training split, embedded as `seqep train` embeds it."""
    from analog_ep.train.trainer import batches, load_task_for, model_embedding

    if shape.name in TEST_SHAPES:
        raise ConfigError(f"shape {shape.name} has no real data (it is a test shape): use --inputs random")
    cfg = _preset_config(shape.name)
    data = load_task_for(cfg, progress=False)
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:batch]
    x, y = next(batches(data.train, model_embedding(cfg, data), batch, "cpu", torch.float32, order,
                        exact_match=cfg.data.exact_match))
    if tuple(x.shape[1:]) != (shape.spec.num_streams, shape.spec.seq_len, shape.spec.dim):
        raise ValueError(f"real {shape.name} batch has shape {tuple(x.shape)}, the bench shape expects "
                         f"(B, {shape.spec.num_streams}, {shape.spec.seq_len}, {shape.spec.dim})")
    return x, y


def bench_batch(shape: Shape, batch: int, inputs: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a bench job times: real (see `real_batch`) or random (`random_batch`); `inputs` resolved."""
    return real_batch(shape, batch, seed) if inputs == "real" else random_batch(shape.spec, batch, seed)


def resolve_inputs(inputs: str, shape_name: str) -> str:
    """"auto" → "real" where the shape's data is found, else "random"; "real" where it cannot run: an error."""
    if inputs not in INPUTS:
        raise ConfigError(f"inputs must be one of {', '.join(INPUTS)}, got {inputs!r}")
    if inputs == "auto":
        return "real" if real_data_available(shape_name) else "random"
    if inputs == "real" and not real_data_available(shape_name):
        why = ("it is a test shape" if shape_name in TEST_SHAPES
               else "its data was not found (set SEQEP_DATA_DIR to a folder laid out like ../shared/data)")
        raise ConfigError(f"--inputs real cannot run for {shape_name}: {why}; or use --inputs random")
    return inputs


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(spec: GraphSpec, batch: int, free_steps: int, nudge_steps: int,
                key_fraction: float = 1.0) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of one symmetric-EP training batch; see FLOP_FORMULA.

    `key_fraction`: share of the L keys per retrieval actually multiplied (the fast path's distinct keys,
    `fast_retrieval.kept_fraction`); 1 counts the plain retrieval, as the algorithm defines it."""
    P = spec.num_projections
    sizes = [spec.fc_input_size, *spec.layers]
    step = 0
    grad = 0
    for k, (a, o) in enumerate(zip(sizes[:-1], sizes[1:])):
        products = 2 if (P or k > 0) else 1  # top-down into the layer below, unless it is the input
        step += products * 2 * a * o
        grad += 2 * a * o
    if P and spec.attention:
        step += round(4 * P * spec.proj_len * spec.seq_len * spec.dim * key_fraction)
    prep = 0
    if P and not spec.pool_queries:
        prep = 2 * P * spec.seq_len * spec.dim * spec.dim
        grad += 2 * P * spec.proj_len * spec.dim * spec.dim
    free = batch * free_steps * step
    nudge = 2 * batch * nudge_steps * step
    total = batch * prep + free + nudge + 2 * batch * grad
    return {"step_per_sample": float(step), "free": float(free), "nudge": float(nudge),
            "prep": float(batch * prep), "grad": float(2 * batch * grad), "total": float(total)}


# ---------------------------------------------------------------------------------------------- machine
def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096), seconds: float = 1.0) -> dict:
    """Best achieved GFLOP/s of a square matmul of each size (the best over a few repetitions)."""
    best: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)
        rates, start = [], time.perf_counter()
        while len(rates) < 3 or (time.perf_counter() - start < seconds and len(rates) < 20):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        best[str(n)] = max(rates)
    return {"gflops": max(best.values()), "by_size": best}


def machine_info() -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name")
        info["caches"] = {k: fields[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in fields}
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    flags = native_kernels.cpu_flags() or []
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile") if f in flags]
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


# ---------------------------------------------------------------------------------------------- load
def _busy_seconds() -> float:
    """CPU-seconds all processes have spent busy (from /proc/stat), or NaN where unavailable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """CPU used by *other* processes while a measurement runs, in cores (0 = we had the machine alone)."""

    def __enter__(self) -> LoadMeter:
        self.load_before = os.getloadavg()[0]
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        foreign = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.foreign_cores = max(0.0, foreign / wall) if wall > 0 and not math.isnan(foreign) else float("nan")
        self.load_after = os.getloadavg()[0]

    def report(self) -> dict:
        return {"loadavg_1m_before": round(self.load_before, 2), "loadavg_1m_after": round(self.load_after, 2),
                "foreign_cores": round(self.foreign_cores, 3)}


def foreign_load(seconds: float = 2.0) -> float:
    """Cores busy with other processes over the next `seconds` (we sleep meanwhile)."""
    with LoadMeter() as meter:
        time.sleep(seconds)
    return meter.foreign_cores


def wait_for_idle(max_cores: float, timeout: float, log=None) -> float:
    """Block until other processes use < max_cores (sampled over 3 s) or timeout; returns the last sample."""
    start = time.time()
    while True:
        busy = foreign_load(3.0)
        if busy < max_cores or time.time() - start > timeout:
            return busy
        if log:
            log(f"waiting for an idle machine: other processes use {busy:.2f} cores")
        time.sleep(10.0)


# ---------------------------------------------------------------------------------------------- workers
class PhaseTimer:
    """Wraps `relax` where the estimators call it, to time the free and the nudged phases of the real path."""

    def __init__(self) -> None:
        self.records: list[tuple[float, int]] = []

    def __enter__(self) -> PhaseTimer:
        self._saved = (dynamics.relax, estimators.relax)
        original = dynamics.relax

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = original(*args, **kwargs)
            self.records.append((time.perf_counter() - t, out[1].steps))
            return out

        dynamics.relax = estimators.relax = timed
        return self

    def __exit__(self, *exc) -> None:
        dynamics.relax, estimators.relax = self._saved


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_net(shape: Shape, reference: bool = False) -> EPNet:
    """The network every mode of a shape times: the shape's spec, seed 0 (the reference: synchronous updates)."""
    spec = replace(shape.spec, schedule="synchronous") if reference else shape.spec
    return EPNet(spec, seed=0)


def _optimizer(net: EPNet, shape: Shape, fused: bool) -> torch.optim.Optimizer:
    names = net.spec.layer_names
    lrs = list(shape.lrs) if len(shape.lrs) == len(names) else float(shape.lrs[0])
    return torch.optim.Adam(layer_param_groups(net, lrs), fused=fused or None)


def run_train(shape: Shape, batch: int, cfg: EPConfig, repeats: int = 1, fused_adam: bool = True,
              warmup: int = WARMUP_BATCHES, inputs: str = "random") -> dict:
    """Seconds for one training batch on the fast path (the real estimator + Adam), with phase times."""
    net = make_net(shape)
    opt = _optimizer(net, shape, fused_adam)
    x, y = bench_batch(shape, batch, inputs)
    for _ in range(warmup):  # compile, oneDNN primitives, and the heap's working set
        train_step(net, make_estimator("ep_symmetric", cfg), x, y, opt)
    times, phases = [], []
    with LoadMeter() as load:
        for _ in range(repeats):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with PhaseTimer() as timer:
                est = ep_symmetric(net, x, y, cfg)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            residual = est.free_trace.final_residual
            del est  # as `train_step` does: no gradients held into the next batch
            times.append(t2 - t0)
            (free_s, free_n), (nudge_s, nudge_n) = timer.records
            phases.append({"free_s": free_s, "nudge_s": nudge_s, "contrast_s": t1 - t0 - free_s - nudge_s,
                           "update_s": t2 - t1, "free_steps": free_n, "nudge_steps": nudge_n})
    best = min(range(repeats), key=lambda i: times[i])
    return {"seconds_per_batch": times[best], "all_seconds": times, "phases": phases[best],
            "free_residual": residual, "peak_rss_mb": _rss_mb(), "load": load.report(),
            "key_fraction": _key_fraction(net, x, cfg)}


def _key_fraction(net: EPNet, x: torch.Tensor, cfg: EPConfig) -> float:
    """Share of the L × L retrieval scores the path computes: < 1 on the fast path when keys repeat."""
    if cfg.precision == "fp32" or not (net.spec.num_projections and net.spec.attention):
        return 1.0
    inputs = net.prepare(x)
    return kept_fraction(inputs.keys, inputs.key_mask)


def run_reference(shape: Shape, batch: int, repeats: int = 1, warmup: int = WARMUP_BATCHES,
                  inputs: str = "random") -> dict:
    """Seconds for one training batch as the paper's code runs it (autograd every step, fp32, phases in turn)."""
    from analog_ep.reference import reference_ep_symmetric

    net = make_net(shape, reference=True)
    opt = _optimizer(net, shape, fused=False)
    x, y = bench_batch(shape, batch, inputs)

    def one(free: int, nudge: int) -> None:
        opt.zero_grad(set_to_none=True)
        estimators.write_grads(net, reference_ep_symmetric(net, x, y, shape.beta, free, nudge))
        opt.step()

    for _ in range(warmup):
        one(shape.free_steps, shape.nudge_steps)
    times = []
    with LoadMeter() as load:
        for _ in range(repeats):
            t = time.perf_counter()
            one(shape.free_steps, shape.nudge_steps)
            times.append(time.perf_counter() - t)
    return {"seconds_per_batch": min(times), "all_seconds": times, "peak_rss_mb": _rss_mb(), "load": load.report()}


def run_inference(shape: Shape, batch: int, cfg: EPConfig, repeats: int = 1, warmup: int = WARMUP_BATCHES,
                  inputs: str = "random") -> dict:
    """Free phase only (prediction), weights fixed: samples per second."""
    net = make_net(shape)
    x, _ = bench_batch(shape, batch, inputs, seed=1)
    residual = "all" if cfg.precision == "fp32" else "fc"
    weights = None if cfg.precision == "fp32" else net.low_precision_weights(cfg.precision)  # fixed: built once

    def one(steps: int) -> int:
        inputs = net.prepare(x, cfg.precision, weights)
        state, trace = dynamics.free_phase(net, inputs, steps, tol=cfg.tol, track=False, residual=residual)
        state[-1].argmax(-1)
        return trace.steps

    for _ in range(warmup):
        one(cfg.free_steps)
    times, steps = [], 0
    with LoadMeter() as load:
        for _ in range(repeats):
            t = time.perf_counter()
            steps = one(cfg.free_steps)
            times.append(time.perf_counter() - t)
    return {"seconds_per_batch": min(times), "samples_per_s": batch / min(times), "free_steps": steps,
            "peak_rss_mb": _rss_mb(), "load": load.report()}


def flat_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten().double() for k in sorted(grads)])


def check_fidelity(shape: Shape, batch: int, cfg: EPConfig, seed: int = 0, inputs: str = "random") -> dict:
    """Angle between the fast path's EP update and the float64 EP update (same net, batch, steps).

    The float64 update is the exact path in float64 without early exit: the numbers EP defines.
    Also reported: the exact float32 path against the same float64 update (the floor fp32 itself sets).
    """
    net = make_net(shape)
    x, y = bench_batch(shape, batch, inputs, seed=seed + 2)
    exact = replace(cfg, precision="fp32", tol=None, nudge_tol=None)
    net64 = copy.deepcopy(net).double()
    g64 = ep_symmetric(net64, x.double(), y, exact, set_grad=False).grads
    del net64
    fast = ep_symmetric(net, x, y, cfg, set_grad=False)
    g32 = ep_symmetric(net, x, y, exact, set_grad=False).grads
    norms = {k: float(v.double().norm()) for k, v in g64.items()}
    total = math.sqrt(sum(n * n for n in norms.values()))
    return {
        "batch": batch,
        "angle_deg": angle_deg(flat_grads(fast.grads), flat_grads(g64)),
        "fp32_exact_angle_deg": angle_deg(flat_grads(g32), flat_grads(g64)),
        "per_param_angle_deg": {k: angle_deg(fast.grads[k], g64[k]) for k in sorted(g64)},
        "per_param_norm_share": {k: norms[k] / total for k in sorted(norms)},
        "relative_error": float((flat_grads(fast.grads) - flat_grads(g64)).norm() / flat_grads(g64).norm()),
        "free_steps": fast.free_trace.steps,
    }


def compare_training(name: str, train_limit: int | None, epochs: int, data_dir: str | None = None,
                     tol: float | None = None, log=None, compile_kernels: bool = True) -> dict:
    """Train the same CPU-preset model twice, same seed and batches: exact path vs bf16 fast path.

    Real data (needs the data directory). Constant learning rates (the preset's, no schedule), the preset's
    free-phase tolerance for both (`tol` overrides it; the nudged phases run all K steps); both models are
    evaluated on the validation split by the same exact fp32 free phase.
    """
    from analog_ep.train.trainer import (
        batches,
        build_model,
        evaluate_split,
        load_task_for,
        make_optimizer,
        model_embedding,
        seed_everything,
    )

    if compile_kernels:
        enable_compiled_kernels(True)
    task_name, preset = name.split("-")
    cfg = load_preset(task_name, preset)
    cfg.data.train_limit = train_limit
    cfg.data.data_dir = data_dir or os.environ.get("SEQEP_DATA_DIR") or cfg.data.data_dir
    cfg.train.epochs = epochs
    data = load_task_for(cfg, progress=False)
    embedding = model_embedding(cfg, data)
    out: dict[str, Any] = {"shape": name, "n_train": len(data.train), "n_val": len(data.val), "epochs": epochs,
                           "tol": tol if tol is not None else cfg.ep.tol}
    predictions: dict[str, torch.Tensor] = {}
    for precision in ("fp32", "bf16"):
        seed_everything(cfg.train.seed)
        net = build_model(cfg, data)
        opt = make_optimizer(cfg, net)
        estimator = make_estimator("ep_symmetric", EPConfig(cfg.ep.beta, cfg.ep.free_steps, cfg.ep.nudge_steps,
                                                            tol=out["tol"], precision=precision))
        t0, steps = time.perf_counter(), []
        for epoch in range(epochs):
            order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(cfg.train.seed + epoch))
            for x, y in batches(data.train, embedding, cfg.train.batch_size, "cpu", torch.float32, order,
                                exact_match=cfg.data.exact_match):
                steps.append(train_step(net, estimator, x, y, opt).free_trace.steps)
        seconds = time.perf_counter() - t0
        val = evaluate_split(net, data.val, embedding, cfg)
        out[precision] = {"val_accuracy": val["accuracy"], "train_seconds": seconds,
                          "mean_free_steps": sum(steps) / max(len(steps), 1)}
        predictions[precision] = val["predictions"]
        if log:
            log(f"{name} {precision}: val accuracy {val['accuracy']:.4f}, {seconds:.0f} s training")
    out["prediction_agreement"] = float((predictions["fp32"] == predictions["bf16"]).float().mean())
    return out


def worker(job: dict) -> dict:
    """One measurement, in this process: job = {kind, shape, batch, precision, tol, nudge_tol, ...}."""
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    if job.get("keep_memory", True):
        keep_freed_memory()
    if job.get("compile"):
        enable_compiled_kernels(True)
    shape = build_shape(job["shape"])
    cfg = EPConfig(shape.beta, shape.free_steps, shape.nudge_steps, tol=job.get("tol"),
                   precision=job.get("precision", "fp32"), nudge_tol=job.get("nudge_tol"))
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
            return {"fp32": matmul_peak(torch.float32, sizes), "bf16": matmul_peak(torch.bfloat16, sizes)}
    raise ValueError(f"unknown job kind {kind!r}")


def run_job(job: dict, subprocess_: bool = True) -> dict:
    """Run a worker job in a fresh Python process (clean peak RSS, no cross-talk), or in this one."""
    if not subprocess_:
        return worker(job)
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "analog_ep.bench.runner", json.dumps(job)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {job} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- driver
def bench(
    shapes: list[str],
    batch: int | None = None,
    precision: str = "bf16",
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
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    # once per shape, before any measurement: a shape that cannot take the inputs fails now, not midway
    inputs_of = {name: resolve_inputs(inputs, name) for name in shapes}

    def note(msg: str) -> None:
        if log:
            log(msg)

    def job(kind: str, shape: Shape, b: int, **extra) -> dict:
        if wait_idle is not None:
            wait_for_idle(wait_idle, wait_timeout, note)
        spec = dict(kind=kind, shape=shape.name, batch=b, repeats=repeats, warmup=warmup, threads=threads,
                    compile=compile_kernels and precision != "fp32", precision=precision,
                    inputs=inputs_of[shape.name])
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
        "settings": {"precision": precision, "early_exit": early_exit, "tol": tol, "reference": reference,
                     "repeats": repeats, "warmup": warmup, "threads": threads or torch.get_num_threads(),
                     "compiled_kernels": compile_kernels and precision != "fp32", "input_rms": INPUT_RMS,
                     "inputs": inputs, "int8_kernel": int8_kernel_name() if precision == "int8" else None},
        "flop_formula": FLOP_FORMULA,
        "foreign_cores_before": round(foreign_load(idle_sample_s), 3) if idle_sample_s > 0 else None,
    }
    # fractions are of the fp32 peak on the exact path, else of the bf16 peak (also for int8: its products
    # run on int8 but the attention and every other product of the step stay bf16)
    basis = "fp32" if precision == "fp32" else "bf16"

    def measure_peaks() -> float:
        """Peaks measured again, the best of all measurements kept (a VM's slow moment must not lower the
        peak and so raise every fraction); returns the basis peak."""
        got = job("peaks", build_shape(shapes[0]), 0, peak_sizes=list(peak_sizes))
        old = report.get("peaks", {"measured": []})
        measured = old["measured"] + [{"fp32_gflops": got["fp32"]["gflops"], "bf16_gflops": got["bf16"]["gflops"],
                                       "by_size": {"fp32": got["fp32"]["by_size"], "bf16": got["bf16"]["by_size"]}}]
        report["peaks"] = {"fp32_gflops": max(m["fp32_gflops"] for m in measured),
                           "bf16_gflops": max(m["bf16_gflops"] for m in measured),
                           "by_size": measured[-1]["by_size"], "basis": basis, "measured": measured}
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
                "ep": {"beta": shape.beta, "free_steps": shape.free_steps, "nudge_steps": shape.nudge_steps,
                       "tol": (tol or shape.tol) if early_exit else None},
            }
            flops = count_flops(shape.spec, b, shape.free_steps, shape.nudge_steps)
            fast = job("train", shape, b)
            ph = fast["phases"]
            executed = count_flops(shape.spec, b, ph["free_steps"], ph["nudge_steps"], fast["key_fraction"])
            relax_s = ph["free_s"] + ph["nudge_s"]
            rec.update(
                seconds_per_batch=fast["seconds_per_batch"], phases=ph, free_residual=fast["free_residual"],
                flops=flops["total"], flops_executed=executed["total"],
                gflops=executed["total"] / fast["seconds_per_batch"] / 1e9,
                relax_gflops=(executed["free"] + executed["nudge"]) / relax_s / 1e9 if relax_s > 0 else None,
                peak_rss_mb=fast["peak_rss_mb"], load=fast["load"], all_seconds=fast["all_seconds"],
                key_fraction=fast["key_fraction"],
            )
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
    lines = [f"peaks: fp32 {report['peaks']['fp32_gflops']:.0f} GFLOP/s, bf16 {report['peaks']['bf16_gflops']:.0f} "
             f"GFLOP/s; precision {report['settings']['precision']}, early exit {report['settings']['early_exit']}",
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
    return "\n".join(lines)


if __name__ == "__main__":  # worker entry: python -m analog_ep.bench.runner '<job json>'
    print(json.dumps(worker(json.loads(sys.argv[1]))))
