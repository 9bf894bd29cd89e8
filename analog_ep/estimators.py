"""Gradient estimators behind one interface: `estimate = estimator(net, x, labels)`.

Each estimator returns an `Estimate` and (unless it applied its own local updates, as C-EP does) leaves
`.grad` on the parameters, so any torch optimizer can take the step. Gradients are of the batch-mean
MSE loss ℓ = ½‖s^N − onehot(y)‖² and are meant to be *descended*.

- `ep_two_phase`: ĝ = −(1/β)[∂Φ/∂θ(s^β) − ∂Φ/∂θ(s*)]            (first-order biased in β; `beta_sign="random"`
  draws the sign of β per batch so the bias cancels on average, as the original EP did; its free phase may run
  longer to settle, see `ep_two_phase`)
- `ep_symmetric`: ĝ = −(1/2β)[∂Φ/∂θ(s^{+β}) − ∂Φ/∂θ(s^{−β})]    (the paper's choice; ±β run as one batch)
- `cep`: continual EP: weights move at every nudged step by (η/β)[∂Φ/∂θ(s_{k+1}) − ∂Φ/∂θ(s_k)]
- `bptt`: backprop through the same dynamics, truncated to the last K steps (`bptt`) or full (`bptt_full`)

`make_estimator(name, cfg)` reads them from one registry, `ESTIMATORS` (name -> function); configs and the CLI
take their choices from it, and `register_estimator` adds one's own under a new name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from types import MappingProxyType

import torch

from analog_ep.dynamics import RelaxTrace, free_phase, relax
from analog_ep.errors import ConfigError
from analog_ep.phi import PRECISIONS, EPNet, Inputs, State, mse_loss, one_hot_target, signed_coef

LearningRates = dict[str, float] | float  # one for all parameters, or one per parameter name
BETA_SIGNS = ("positive", "random")  # the one-sided estimators' β: always +β, or ±β drawn per batch


@dataclass(frozen=True)
class EPConfig:
    """Phase lengths and nudging strength (paper IMDB: β=0.1, T₁=50, K=25)."""

    beta: float = 0.1
    free_steps: int = 50
    nudge_steps: int = 25
    tol: float | None = None  # early exit of the free phase when the residual falls below tol
    precision: str = "fp32"  # "bf16"/"int8": large products in low precision (phi.LowPrecision); "fp32": exact
    nudge_tol: float | None = None  # early exit of the nudged phase(s) when the residual falls below nudge_tol
    fold: bool = False  # fp32: relax with the first synapse folded onto the keys (`analog_ep.fast.folded`)
    beta_sign: str = "positive"  # one-sided estimators (two-phase EP, C-EP): "random" draws ±β per batch from
    # torch's global generator (seeded and checkpointed by the trainer, so runs stay reproducible)

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.beta_sign not in BETA_SIGNS:
            raise ValueError(f"beta_sign must be one of {BETA_SIGNS}, got {self.beta_sign!r}")
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
    """`.grad` of every parameter from `grads`; one without an estimate gets none (a learned word-vector table fed
    vectors instead of token ids: the optimiser leaves it as it is)."""
    for name, p in net.named_parameters():
        p.grad = grads[name].to(p.dtype) if name in grads else None


def _residual(cfg: EPConfig) -> str:
    """Which layers the convergence residual is measured on: all (exact path) or FC only (fast path, and the folded
    exact path, whose projection state exists per step only as attention weights: forming it to measure it would
    cost the free phase a third of its time)."""
    return "all" if cfg.precision == "fp32" and not cfg.fold else "fc"


def _free(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, refine: bool | str = True):
    """Free phase of an estimator. On the fast path it ends in the difference form of the nudged phases (see
    `dynamics.relax`), so that they start from a fixed point of the dynamics they run. One-sided EP needs it from
    the stall on (`refine=True`); symmetric EP needs it too once the network is trained, and for the last steps
    only (`refine="last"`: int8 at imdb-paper after 100 training batches, 13.3° from the float64 update without
    it, 0.17° with the last 5 steps, 0.42° from the stall on; 0.19° and 0.03° on the untrained network)."""
    inputs = net.prepare(x, cfg.precision, fold=cfg.fold)
    target = one_hot_target(labels, net.spec.num_classes, inputs_dtype(net))
    state, trace = free_phase(net, inputs, cfg.free_steps, tol=cfg.tol, residual=_residual(cfg),
                              refine=refine if cfg.tol is None else True)
    return inputs, target, state, trace


def inputs_dtype(net: EPNet) -> torch.dtype:
    return net.weights[0].dtype


def signed_beta(cfg: EPConfig) -> float:
    """The β of one batch of a one-sided estimator: +β, or ±β with equal odds (`beta_sign="random"`).

    A one-sided nudge has a first-order bias O(β) of fixed sign (Laborieux et al. 2021); a random sign per
    batch cancels it on average, as the original EP (Scellier & Bengio 2017) did. It is an option, not the
    default: on the IMDB smoke preset it helped only while the free phase was cut short (20 free steps, seed 0:
    test 72.65 % instead of 64.0 %) and hurt once it settles (40 steps: 64.45 % instead of 76.65 %);
    docs/results.md has the table.
    """
    if cfg.beta_sign == "random" and torch.randint(2, ()).item() == 0:
        return -cfg.beta
    return cfg.beta


ONE_SIDED_SETTLE = 2  # two-phase EP's free phase may run this many times `free_steps` while above `tol`


@torch.no_grad()
def ep_two_phase(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, set_grad: bool = True) -> Estimate:
    """Two-phase EP. With early exit (`cfg.tol`), the free phase may take up to ONE_SIDED_SETTLE × `free_steps`
    to reach `tol`: a free phase stopped short keeps drifting during the nudged phase, and the one-sided contrast
    reads that drift / β as gradient (symmetric EP cancels it: both of its phases drift alike). Measured on the
    IMDB smoke preset (free_steps 20, tol 1e-4, fp32): free phases stopped at residuals up to 0.07–0.36 and
    two-phase EP ended at 64.0 % (seed 0) and 50.0 % (seed 1, constant outputs); with 40 free steps, 76.65 %."""
    if cfg.tol is not None:
        cfg = replace(cfg, free_steps=cfg.free_steps * ONE_SIDED_SETTLE)
    inputs, target, free, trace = _free(net, x, labels, cfg)
    beta = signed_beta(cfg)
    nudge_inputs, start = net.nudge_start(inputs, free)
    nudged, _ = relax(net, nudge_inputs, start, cfg.nudge_steps, beta=beta, target=target, track=False,
                      tol=cfg.nudge_tol, residual=_residual(cfg))
    nudged = net.full_state(nudge_inputs, nudged)
    B = x.shape[0]
    coef = signed_coef(B, -1.0 / (beta * B), free[-1])
    grads = net.phi_param_grads(inputs.repeat(2), stack_states(nudged, free), coef)
    if set_grad:
        write_grads(net, grads)
    return Estimate(grads, free[-1], float(mse_loss(free[-1], target)), trace)


@torch.no_grad()
def ep_symmetric(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, set_grad: bool = True) -> Estimate:
    inputs, target, free, trace = _free(net, x, labels, cfg, refine="last")
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
    lrs: LearningRates,
    set_grad: bool = True,
) -> Estimate:
    """Continual EP: the nudged phase moves the weights at every step, using only s_k and s_{k+1}.

    `lrs` is η per parameter name (or one float). The returned `grads` are the equivalent descent
    direction −Δθ/η, for logging and for the GDU comparison; the weights have already moved.
    C-EP always runs the exact path (`cfg.precision` and `cfg.nudge_tol` are ignored).
    """
    # per-step differences of states: the exact path only
    cfg = replace(cfg, precision="fp32", nudge_tol=None, fold=False)
    inputs, target, state, trace = _free(net, x, labels, cfg)
    B = x.shape[0]
    beta = signed_beta(cfg)
    params = dict(net.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    free_output = state[-1]
    loss = float(mse_loss(free_output, target))
    coef = signed_coef(B, 1.0 / (beta * B), free_output)  # ascent on Φ difference = descent on ℓ
    etas = {n: (lrs if isinstance(lrs, float) else lrs[n]) for n in params}
    for _ in range(cfg.nudge_steps):
        new = net.step(inputs, state, beta, target)
        increments = net.phi_param_grads(inputs.repeat(2), stack_states(new, state), coef)
        for n, inc in increments.items():
            params[n].add_(inc, alpha=etas[n])
            total[n].add_(inc)
        if net.spec.num_projections or inputs.ids is not None:  # the projection synapse or the learned word
            inputs = net.prepare(x)  # vectors moved: refresh the inputs they make
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


Estimator = Callable[[EPNet, torch.Tensor, torch.Tensor], Estimate]


@dataclass(frozen=True)
class RegisteredEstimator:
    """An estimator function `fn(net, x, labels, cfg)`, or `fn(net, x, labels, cfg, lrs)` when it moves the
    weights itself and needs its step sizes (`needs_lrs`, as C-EP does).

    `beta_sign`: for an estimator with a one-sided nudge, the `EPConfig.beta_sign` it trains with unless told
    otherwise (`training_beta_sign`); None where β has no sign to choose (symmetric EP, BPTT)."""

    fn: Callable[..., Estimate]
    needs_lrs: bool = False
    beta_sign: str | None = None


_REGISTRY: dict[str, RegisteredEstimator] = {
    "ep_symmetric": RegisteredEstimator(ep_symmetric),
    "ep_two_phase": RegisteredEstimator(ep_two_phase, beta_sign="positive"),
    "cep": RegisteredEstimator(cep, needs_lrs=True, beta_sign="positive"),
    "bptt": RegisteredEstimator(bptt),
    "bptt_full": RegisteredEstimator(partial(bptt, truncate=None)),
}
BUILTIN_ESTIMATORS = tuple(_REGISTRY)

ESTIMATORS: Mapping[str, RegisteredEstimator] = MappingProxyType(_REGISTRY)
"""Every estimator by name, the built-in ones and those added by `register_estimator` (a live, read-only view:
usable as argparse `choices` and wherever the known names are listed)."""


def training_beta_sign(name: str, requested: str = "auto") -> str:
    """The `EPConfig.beta_sign` a training run of estimator `name` uses: `requested`, or with "auto" the
    estimator's own default (positive for two-phase EP and C-EP: see `signed_beta`). A sign
    asked of an estimator whose β has none (symmetric EP nudges both ways already; BPTT has no β) is refused
    rather than silently ignored."""
    entry = _REGISTRY.get(name)
    if entry is None or requested == "auto":
        return entry.beta_sign if entry is not None and entry.beta_sign else "positive"
    if requested not in BETA_SIGNS:
        raise ConfigError(f"ep.beta_sign = {requested!r}; choose one of {['auto', *BETA_SIGNS]}")
    if entry.beta_sign is None:
        raise ConfigError(f"ep.beta_sign = {requested!r} has no effect on estimator {name!r} (its nudge is not "
                          "one-sided); leave it at auto, or pick ep_two_phase or cep")
    return requested


def register_estimator(name: str, fn: Callable[..., Estimate], *, needs_lrs: bool = False,
                       overwrite: bool = False, beta_sign: str | None = None) -> Callable[..., Estimate]:
    """Make `fn(net, x, labels, cfg) -> Estimate` known to `make_estimator` (and so to configs) as `name`.

    `needs_lrs=True`: `fn` takes the per-parameter step sizes as a fifth argument (see `cep`). `beta_sign`: the
    sign rule it trains with when its nudge is one-sided (see `RegisteredEstimator`). A name already taken is
    refused unless `overwrite=True`. Returns `fn`.

    Example:
        >>> import torch
        >>> from analog_ep import ESTIMATORS, EPConfig, EPNet, build_spec, make_estimator, register_estimator
        >>> from analog_ep.estimators import ep_symmetric, unregister_estimator
        >>> def small_beta(net, x, labels, cfg):
        ...     return ep_symmetric(net, x, labels, EPConfig(cfg.beta / 10, cfg.free_steps, cfg.nudge_steps))
        >>> _ = register_estimator("ep_small_beta", small_beta)
        >>> net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0)
        >>> x, y = torch.randn(4, 1, 1, 20), torch.tensor([0, 1, 2, 0])
        >>> make_estimator("ep_small_beta", EPConfig(free_steps=20, nudge_steps=5))(net, x, y).output.shape
        torch.Size([4, 3])
        >>> unregister_estimator("ep_small_beta")
        >>> "ep_small_beta" in ESTIMATORS
        False
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an estimator name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ConfigError(f"estimator {name!r}: {fn!r} is not callable; register a function fn(net, x, labels, cfg)")
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"estimator {name!r} is already registered; pick another name or pass overwrite=True")
    if beta_sign is not None and beta_sign not in BETA_SIGNS:
        raise ConfigError(f"estimator {name!r}: beta_sign must be one of {BETA_SIGNS} or None, got {beta_sign!r}")
    _REGISTRY[name] = RegisteredEstimator(fn, needs_lrs, beta_sign)
    return fn


def unregister_estimator(name: str) -> None:
    """Forget an estimator added by `register_estimator` (the built-in ones stay)."""
    if name in BUILTIN_ESTIMATORS:
        raise ConfigError(f"estimator {name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)


def make_estimator(name: str, cfg: EPConfig, lrs: LearningRates | None = None) -> Estimator:
    """An estimator callable `estimator(net, x, labels)` by name. C-EP needs its per-parameter step sizes `lrs`.

    Example:
        >>> import torch
        >>> from analog_ep import EPConfig, EPNet, build_spec, make_estimator
        >>> net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0)
        >>> x, y = torch.randn(4, 1, 12, 8), torch.tensor([0, 1, 1, 0])
        >>> estimate = make_estimator("ep_symmetric", EPConfig(beta=0.1, free_steps=20, nudge_steps=5))(net, x, y)
        >>> sorted(estimate.grads) == sorted(name for name, _ in net.named_parameters())
        True
        >>> estimate.output.shape, estimate.loss > 0
        (torch.Size([4, 2]), True)
        >>> make_estimator("ep_magic", EPConfig())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        analog_ep.errors.ConfigError: unknown estimator 'ep_magic'; choose one of ep_symmetric, ep_two_phase, cep, ...
    """
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"unknown estimator {name!r}; choose one of {', '.join(_REGISTRY)} "
                          "(or add yours with analog_ep.register_estimator)")
    if entry.needs_lrs:
        if lrs is None:
            raise ConfigError(f"the {name} estimator needs per-parameter learning rates: pass lrs "
                              "(one float, or a dict parameter name -> learning rate)")
        return lambda net, x, labels: entry.fn(net, x, labels, cfg, lrs)
    return lambda net, x, labels: entry.fn(net, x, labels, cfg)


def cep_on_copy(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, lr: float) -> Estimate:
    """C-EP's descent direction without touching `net` (for comparisons)."""
    return cep(copy.deepcopy(net), x, labels, cfg, lr)


__all__ = [
    "EPConfig", "Estimate", "ESTIMATORS", "ep_two_phase", "ep_symmetric", "cep", "bptt", "make_estimator",
    "register_estimator", "unregister_estimator", "RegisteredEstimator", "BETA_SIGNS", "training_beta_sign",
    "signed_beta",
    "cep_on_copy", "write_grads", "Inputs",
]
