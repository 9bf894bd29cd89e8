"""Relaxation to a fixed point: free phase from zeros, nudged phases from the free fixed point.

`relax` is the one solver both EP phases use; it returns the final state and a `RelaxTrace` (residual
‖s_{t+1} − s_t‖_∞ and Φ per step) that can be plotted or checked for convergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from analog_ep.errors import NumericalError
from analog_ep.fast.step_graph import MODES as GRAPH_MODES
from analog_ep.fast.step_graph import GraphedStep, default_mode
from analog_ep.phi import EPNet, Inputs, State

REFINE_PATIENCE = 2  # fast path: steps without progress before switching to the difference form
REFINE_BELOW = 2e-3  # ... and only once the residual is this small (near the bf16 floor, not in the transient)
REFINE_LAST = 5  # ... and in any case for the last steps of a relaxation, so that it ends in that form


@dataclass
class RelaxTrace:
    """Convergence record of one relaxation (batch-level)."""

    residuals: list[float] = field(default_factory=list)  # max |s_{t+1} - s_t| over all units
    phi: list[float] = field(default_factory=list)  # mean Φ over the batch at s_t (if recorded)
    steps: int = 0
    refined_at: int | None = None  # fast path: step after which the difference form took over (see relax)

    @property
    def final_residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")


def check_finite(net: EPNet, state: State, phase: str, step: int) -> None:
    """Raise NumericalError naming the first layer holding NaN/Inf (a diverged network), else nothing."""
    for name, s in zip(net.spec.layer_names, state):
        if not bool(torch.isfinite(s).all()):
            bad = [p for p, t in net.named_parameters() if not bool(torch.isfinite(t).all())]
            cause = (f"the parameters {', '.join(bad)} hold NaN/Inf (a learning rate too high: lower train.lrs)"
                     if bad else "the weights are finite, so NaN/Inf came with the inputs or the target "
                     "(corrupt word vectors or data?)")
            raise NumericalError(f"the {phase} phase diverged: layer {name} holds NaN/Inf at step {step}; {cause}. "
                                 "Resume from the last good checkpoint (with a smaller learning rate)")


@torch.no_grad()
def relax(
    net: EPNet,
    inputs: Inputs,
    state: State,
    steps: int,
    beta: float | torch.Tensor = 0.0,
    target: torch.Tensor | None = None,
    tol: float | None = None,
    track: bool = True,
    record_phi: bool = False,
    residual: str = "all",
    refine: bool | str = True,
    graph: str | None = None,
) -> tuple[State, RelaxTrace]:
    """Run up to `steps` synchronous updates; stop early once the residual is below `tol`.

    A state that turns NaN/Inf raises `NumericalError` naming the layer, phase and step (at that step when
    residuals are tracked, else after the last step: NaN never recovers, so nothing is missed).

    With `track=False` and no `tol`, no residual is computed (no host sync per step: fastest).
    `residual="fc"` measures it on the fully connected layers only (the fast path): the projection state
    is a function of the layer above it, so once those stop moving it stops one step later, and its
    (B, P, L, d) difference, the largest tensor of the step, is never formed.

    Fast path (`inputs.lowp`, residuals tracked): bf16 rounding makes the plain iteration dither at
    ~1e-4–1e-3, above useful tolerances, around a fixed point off by as much. Once the residual stops
    falling (REFINE_PATIENCE steps without halving its best value, below REFINE_BELOW; not with
    `refine="last"`), and in any case for the last REFINE_LAST steps, the relaxation continues in the difference
    form of
    `EPNet.nudge_start` around the current state, whose steps are exact to fp32 relative to the (small)
    remaining motion: it converges like the fp32 path, to a fixed point as sharp as fp32's, at the same
    cost per step, and the nudged phases (written around that point) start from a true fixed point of
    the dynamics they run, which two-phase EP needs, and symmetric EP too once a network is trained (an offset
    of s* moves s⁺ and s⁻ alike only to first order: `estimators._free` has the measurements). The state
    returned is in full form. `refine=False` skips it.

    `graph`: "capture" replays the step as a CUDA graph on static state buffers (`fast.step_graph`: a GPU's
    steps are launch-bound), "static" runs the same buffers eagerly (any device: the tests' check of that loop),
    "off" the plain loop; None: "capture" where `step_graph.ENABLED` and the state is on a CUDA device, else
    "off". The numbers are the same in every mode. With graphs, residuals that nothing reads during the
    relaxation (tracked, no `tol`, no stall test) are read once at the end.

    Example:
        >>> import torch
        >>> from analog_ep import EPNet, build_spec, relax
        >>> net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
        >>> inputs = net.prepare(torch.randn(3, 1, 12, 8, dtype=torch.float64))
        >>> state, trace = relax(net, inputs, net.zero_state(3), steps=60, tol=1e-9)   # free phase: β = 0
        >>> trace.steps < 60 and trace.final_residual < 1e-9                # converged, stopped early
        True
        >>> [tuple(s.shape) for s in state]            # projection, FC 32 and 10, output: prediction = argmax
        [(3, 1, 12, 8), (3, 32), (3, 10), (3, 2)]
        >>> target = torch.nn.functional.one_hot(torch.tensor([0, 1, 1]), 2).double()
        >>> nudged, _ = relax(net, inputs, state, steps=10, beta=0.5, target=target)   # nudged towards y
        >>> bool(((nudged[-1] - target).abs() < (state[-1] - target).abs()).all())
        True
    """
    if residual not in ("all", "fc"):
        raise ValueError(f"residual must be 'all' or 'fc', got {residual!r}")
    first = 1 if residual == "fc" and net.spec.num_projections else 0
    trace = RelaxTrace()
    nudged = target is not None and not (isinstance(beta, float) and beta == 0.0)
    phase = "nudged" if nudged else "free"
    if inputs.folded is not None:  # the first synapse folded onto the keys: the same steps, sample by sample
        from analog_ep.fast import folded

        if record_phi:
            raise ValueError("record_phi needs the full state at every step: prepare the inputs without fold")
        state, trace.residuals, trace.steps = folded.relax(net, inputs, state, steps, beta, target if nudged else None,
                                                           tol, track, residual)
        check_finite(net, state, phase, trace.steps)
        return state, trace
    refining = bool(refine) and (track or tol is not None) and inputs.lowp is not None and inputs.lowp.base is None
    stall_refine = refining and refine != "last"  # the stall test reads every step's residual as it comes
    if not nudged:
        net.plan_free_phase(inputs, steps, tol)
    mode = default_mode(state) if graph is None else graph
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph must be one of {GRAPH_MODES} or None, got {graph!r}")
    tgt = target if nudged else None

    def graphed_steps(inputs: Inputs, state: State) -> GraphedStep | None:
        if mode == "off" or record_phi:
            return None
        return GraphedStep(lambda s: net.step(inputs, s, beta, tgt), state, first, mode)

    graphed = graphed_steps(inputs, state)
    deferred: list[torch.Tensor] = []  # graphed steps' residuals on the device, read once at the end
    best, stalled = float("inf"), 0
    for _ in range(steps):
        if record_phi:
            trace.phi.append(float(net.phi(inputs, state).mean()))
        res = None
        if graphed is None:
            new = net.step(inputs, state, beta, tgt)
            if track or tol is not None:
                moves = [float((a - b).abs().max()) for a, b in zip(new[first:], state[first:])]
                res = max(moves) if all(map(math.isfinite, moves)) else math.nan  # max() would drop a NaN
        else:
            graphed.run()
            new = list(graphed.state)
            if tol is not None or stall_refine:
                res = float(graphed.residual)
            elif track:
                deferred.append(graphed.residual.clone())
        if res is not None:
            if not math.isfinite(res):  # NaN propagates through every later step: stop at the first
                check_finite(net, new, phase, trace.steps + 1)
            trace.residuals.append(res)
        state = new
        trace.steps += 1
        if tol is not None and trace.residuals[-1] < tol:
            break
        if refining and trace.refined_at is None:
            stalled_out = False
            if stall_refine:
                res = trace.residuals[-1]
                stalled = 0 if res < 0.5 * best else stalled + 1
                best = min(best, res)
                stalled_out = stalled >= REFINE_PATIENCE and res < REFINE_BELOW
            if stalled_out or trace.steps == steps - REFINE_LAST:
                inputs, state = net.nudge_start(inputs, state)
                net.plan_free_phase(inputs, steps - trace.steps, tol)  # still the free phase: what is left of it
                trace.refined_at = trace.steps
                graphed = graphed_steps(inputs, state)
    first_bad = trace.steps
    if deferred:  # NaN never recovers: the first non-finite residual names the step
        trace.residuals = torch.stack(deferred).tolist()
        first_bad = next((t + 1 for t, r in enumerate(trace.residuals) if not math.isfinite(r)), first_bad)
    if trace.refined_at is not None:
        state = net.full_state(inputs, state)
    if deferred or not (track or tol is not None):  # one check at the end (NaN is never lost on the way)
        check_finite(net, state, phase, first_bad)
    return state, trace


def free_phase(
    net: EPNet, inputs: Inputs, steps: int, tol: float | None = None, track: bool = True, record_phi: bool = False,
    residual: str = "all", refine: bool | str = True,
) -> tuple[State, RelaxTrace]:
    """β = 0 from the zero state: the network's prediction is the output at this fixed point."""
    return relax(net, inputs, net.zero_state(inputs.batch_size), steps, tol=tol, track=track, record_phi=record_phi,
                 residual=residual, refine=refine)


def predict(net: EPNet, x: torch.Tensor, steps: int, tol: float | None = None, precision: str = "fp32",
            weights: list | None = None) -> torch.Tensor:
    """Class predictions (argmax of the free-phase output) for embedded inputs x: (B, S, L, d).

    precision "bf16" / "int8" runs the large products in low precision (see `phi.LowPrecision`). The
    low-precision weights are rebuilt on every call unless `weights` (from `net.low_precision_weights`,
    built once while the parameters do not change) is given: worth it for int8, whose packing costs ~1 s
    at the paper's IMDB shape.
    """
    fast = precision != "fp32"
    with torch.no_grad():
        state, _ = free_phase(net, net.prepare(x, precision, weights), steps, tol=tol, track=False,
                              residual="fc" if fast else "all")
    return state[-1].argmax(-1)
