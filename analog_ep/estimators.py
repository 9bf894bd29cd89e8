"""Gradient estimators behind one interface: `estimate = estimator(net, x, labels)`.

Each estimator returns an `Estimate` and (unless it applied its own local updates, as C-EP does) leaves
`.grad` on the parameters, so any torch optimizer can take the step. Gradients are of the batch-mean
MSE loss ℓ = ½‖s^N − onehot(y)‖² and are meant to be *descended*.

- `ep_two_phase`: ĝ = −(1/β)[∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)]            (first-order biased in β)
- `ep_symmetric`: ĝ = −(1/2β)[∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})]    (the paper's choice; ±β run as one batch)
- `cep`: continual EP: weights move at every nudged step by (η/β)[∂Φ/∂θ(s_{k+1}) − ∂Φ/∂θ(s_k)]
- `bptt`: backprop through the same dynamics, truncated to the last K steps (`bptt`) or full (`bptt_full`)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from analog_ep.dynamics import RelaxTrace, free_phase, relax
from analog_ep.phi import PRECISIONS, EPNet, Inputs, State, mse_loss, one_hot_target, signed_coef


@dataclass(frozen=True)
class EPConfig:
    """Phase lengths and nudging strength (paper IMDB: β=0.1, T₁=50, K=25)."""

    beta: float = 0.1
    free_steps: int = 50
    nudge_steps: int = 25
    tol: float | None = None  # early exit of the free phase when the residual falls below tol
    precision: str = "fp32"  # "bf16"/"int8": large products in low precision (phi.LowPrecision); "fp32": exact
    nudge_tol: float | None = None  # early exit of the nudged phase(s) when the residual falls below nudge_tol

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.free_steps < 1 or self.nudge_steps < 1:
            raise ValueError("free_steps and nudge_steps must be ≥ 1")


@dataclass
class Estimate:
    grads: dict[str, torch.Tensor]  # gradient estimate per parameter name (to be descended)
    output: torch.Tensor  # free-phase output (B, C): prediction = argmax
    loss: float  # MSE at the free fixed point (batch mean)
    free_trace: RelaxTrace
    applied: bool = False  # True when the estimator already moved the weights (C-EP)


def stack_states(a: State, b: State) -> State:
    return [torch.cat([sa, sb]) for sa, sb in zip(a, b)]


def write_grads(net: EPNet, grads: dict[str, torch.Tensor]) -> None:
    for name, p in net.named_parameters():
        p.grad = grads[name].to(p.dtype)


def _residual(cfg: EPConfig) -> str:
    """Which layers the convergence residual is measured on: all (exact path) or FC only (fast path)."""
    return "all" if cfg.precision == "fp32" else "fc"


def _free(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, exact_fixed_point: bool = True):
    """Free phase of an estimator. `exact_fixed_point=False`: the fast path may end where bf16 dithers
    (see `dynamics.relax`), unless early exit needs the sharper residual."""
    inputs = net.prepare(x, cfg.precision)
    target = one_hot_target(labels, net.spec.num_classes, inputs_dtype(net))
    state, trace = free_phase(net, inputs, cfg.free_steps, tol=cfg.tol, residual=_residual(cfg),
                              refine=exact_fixed_point or cfg.tol is not None)
    return inputs, target, state, trace


def inputs_dtype(net: EPNet) -> torch.dtype:
    return net.weights[0].dtype


@torch.no_grad()
def ep_two_phase(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, set_grad: bool = True) -> Estimate:
    inputs, target, free, trace = _free(net, x, labels, cfg)
    nudge_inputs, start = net.nudge_start(inputs, free)
    nudged, _ = relax(net, nudge_inputs, start, cfg.nudge_steps, beta=cfg.beta, target=target, track=False,
                      tol=cfg.nudge_tol, residual=_residual(cfg))
    nudged = net.full_state(nudge_inputs, nudged)
    B = x.shape[0]
    coef = signed_coef(B, -1.0 / (cfg.beta * B), free[-1])
    grads = net.phi_param_grads(inputs.repeat(2), stack_states(nudged, free), coef)
    if set_grad:
        write_grads(net, grads)
    return Estimate(grads, free[-1], float(mse_loss(free[-1], target)), trace)


@torch.no_grad()
def ep_symmetric(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, set_grad: bool = True) -> Estimate:
    inputs, target, free, trace = _free(net, x, labels, cfg, exact_fixed_point=False)
    B = x.shape[0]
    inputs2, start = net.nudge_start(inputs, free, times=2)  # +β rows then −β rows, one batch
    betas = signed_coef(B, cfg.beta, free[-1]).view(-1, 1)
    handed = [start]
    del start  # relax holds the only reference: the starting state is freed once replaced, not kept to the end
    nudged, _ = relax(
        net, inputs2, handed.pop(), cfg.nudge_steps, beta=betas, target=target.repeat(2, 1), track=False,
        tol=cfg.nudge_tol, residual=_residual(cfg),
    )
    grads = net.symmetric_contrast(inputs2, nudged, -1.0 / (2 * cfg.beta * B))
    if set_grad:
        write_grads(net, grads)
    return Estimate(grads, free[-1], float(mse_loss(free[-1], target)), trace)


@torch.no_grad()
def cep(
    net: EPNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    cfg: EPConfig,
    lrs: dict[str, float] | float,
    set_grad: bool = True,
) -> Estimate:
    """Continual EP: the nudged phase moves the weights at every step, using only s_k and s_{k+1}.

    `lrs` is η per parameter name (or one float). The returned `grads` are the equivalent descent
    direction −Δθ/η, for logging and for the GDU comparison; the weights have already moved.
    C-EP always runs the exact path (`cfg.precision` and `cfg.nudge_tol` are ignored).
    """
    cfg = replace(cfg, precision="fp32", nudge_tol=None)  # per-step differences of states: the exact path only
    inputs, target, state, trace = _free(net, x, labels, cfg)
    B = x.shape[0]
    etas = {n: (lrs if isinstance(lrs, float) else lrs[n]) for n, _ in net.named_parameters()}
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    free_output = state[-1]
    loss = float(mse_loss(free_output, target))
    coef = signed_coef(B, 1.0 / (cfg.beta * B), free_output)  # ascent on Φ difference = descent on ℓ
    for _ in range(cfg.nudge_steps):
        new = net.step(inputs, state, cfg.beta, target)
        increments = net.phi_param_grads(inputs.repeat(2), stack_states(new, state), coef)
        for n, inc in increments.items():
            params[n].add_(inc, alpha=etas[n])
            total[n].add_(inc)
        if net.spec.num_projections:  # the projection synapse moved: refresh its input drive
            inputs = net.prepare(x)
        state = new
    grads = {n: -t for n, t in total.items()}
    for p in params.values():
        p.grad = None
    return Estimate(grads, free_output, loss, trace, applied=True)


def bptt(
    net: EPNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    cfg: EPConfig,
    truncate: int | None = -1,
    set_grad: bool = True,
) -> Estimate:
    """Backprop through the relaxation: T₁ − k steps without a graph, then k steps with one.

    truncate = -1 (default): k = cfg.nudge_steps (the GDU comparison); None: full BPTT over all T₁ steps.
    """
    k = cfg.nudge_steps if truncate == -1 else (cfg.free_steps if truncate is None else truncate)
    k = min(k, cfg.free_steps)
    target = one_hot_target(labels, net.spec.num_classes, inputs_dtype(net))
    with torch.no_grad():
        state, trace = free_phase(net, net.prepare(x), cfg.free_steps - k)
    names, params = zip(*net.named_parameters())
    with torch.enable_grad():
        inputs = net.prepare(x)
        for _ in range(k):
            state = net.step(inputs, state)
        loss = mse_loss(state[-1], target)
        grads = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)))
    trace.steps += k
    if set_grad:
        write_grads(net, grads)
    return Estimate(grads, state[-1].detach(), float(loss.detach()), trace)


ESTIMATORS = ("ep_symmetric", "ep_two_phase", "cep", "bptt", "bptt_full")

Estimator = Callable[[EPNet, torch.Tensor, torch.Tensor], Estimate]


def make_estimator(name: str, cfg: EPConfig, lrs: dict[str, float] | float | None = None) -> Estimator:
    """An estimator callable by name. C-EP needs its per-parameter step sizes `lrs`."""
    if name == "ep_symmetric":
        return lambda net, x, y: ep_symmetric(net, x, y, cfg)
    if name == "ep_two_phase":
        return lambda net, x, y: ep_two_phase(net, x, y, cfg)
    if name == "cep":
        if lrs is None:
            raise ValueError("the cep estimator needs per-parameter learning rates (lrs)")
        return lambda net, x, y: cep(net, x, y, cfg, lrs)
    if name == "bptt":
        return lambda net, x, y: bptt(net, x, y, cfg)
    if name == "bptt_full":
        return lambda net, x, y: bptt(net, x, y, cfg, truncate=None)
    raise ValueError(f"unknown estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")


def cep_on_copy(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, lr: float) -> Estimate:
    """C-EP's descent direction without touching `net` (for comparisons)."""
    return cep(copy.deepcopy(net), x, labels, cfg, lr)


__all__ = [
    "EPConfig", "Estimate", "ESTIMATORS", "ep_two_phase", "ep_symmetric", "cep", "bptt", "make_estimator",
    "cep_on_copy", "write_grads", "Inputs",
]
