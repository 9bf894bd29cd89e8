"""Seconds per batch of each timed mode: a fast-path training batch (with its phase times), the
reference-equivalent mode (the paper's way of running the same algorithm), and inference."""

from __future__ import annotations

import resource
import time

import torch

from analog_ep import dynamics, estimators
from analog_ep.bench.load import LoadMeter
from analog_ep.bench.shapes import Shape, bench_batch, make_net
from analog_ep.estimators import EPConfig, ep_symmetric, make_estimator
from analog_ep.fast import delta_int8
from analog_ep.fast.retrieval import kept_fraction
from analog_ep.phi import EPNet
from analog_ep.train.inner_loop import layer_param_groups, train_step

WARMUP_BATCHES = 2  # untimed full batches before timing, in every mode (compile, oneDNN primitives, heap)


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
    delta_int8.reset_work()
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
            "key_fraction": _key_fraction(net, x, cfg), "change_products": delta_int8.work_done()}


def _key_fraction(net: EPNet, x: torch.Tensor, cfg: EPConfig) -> float:
    """Share of the L × L retrieval scores the path computes: < 1 where keys repeat, on the fast path and where
    the exact path retrieves over distinct keys (the folded path forms no scores over d: reported as 1)."""
    if cfg.fold or not (net.spec.num_projections and net.spec.attention):
        return 1.0
    if cfg.precision == "fp32":
        with torch.no_grad():
            distinct = net.prepare(x).distinct
        return 1.0 if distinct is None else distinct.kept_fraction
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
        inputs = net.prepare(x, cfg.precision, weights, fold=cfg.fold)
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
