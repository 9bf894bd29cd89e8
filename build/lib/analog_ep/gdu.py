"""EP-vs-BPTT gradient agreement (the "GDU" check; the paper's Fig. 2).

Theory (Scellier & Bengio 2019; Ernoult et al. 2019): on a converged free phase, EP's update after k
nudged steps equals, as β → 0, BPTT's gradient over the last k free-phase steps. We report, per
layer, the relative RMS error and sign agreement, and the whole-model angle in degrees.
"""

from __future__ import annotations

import math

import torch

from analog_ep.dynamics import free_phase
from analog_ep.errors import SeqepError
from analog_ep.estimators import EPConfig, bptt, cep_on_copy, ep_symmetric, ep_two_phase, stack_states
from analog_ep.phi import EPNet, mse_loss, one_hot_target

Grads = dict[str, torch.Tensor]


class GDUUndefinedError(SeqepError):
    """The agreement is 0/0 here (a gradient is exactly zero); the message says why and what to change."""


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two flattened tensors, in degrees (NaN if either is zero)."""
    a, b = a.flatten().double(), b.flatten().double()
    denom = a.norm() * b.norm()
    if denom == 0:
        return float("nan")
    return math.degrees(math.acos(max(-1.0, min(1.0, float(a @ b / denom)))))


def relative_rms_error(est: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean (est − ref)²) / max(rms est, rms ref), the field's per-layer error."""
    est, ref = est.double(), ref.double()
    scale = max(float(est.pow(2).mean().sqrt()), float(ref.pow(2).mean().sqrt()))
    return float((est - ref).pow(2).mean().sqrt()) / scale if scale > 0 else 0.0


def sign_agreement(est: torch.Tensor, ref: torch.Tensor) -> float:
    """1 − fraction of entries whose signs are opposite."""
    return 1.0 - float(((est * ref) < 0).double().mean())


def compare_grads(est: Grads, ref: Grads, layer_of: dict[str, str], noise_floor: float = 1e-10) -> dict:
    """Per-layer (all parameters feeding a layer together) and whole-model agreement of est with ref.

    A layer whose two gradients are both below `noise_floor` × the largest layer RMS counts as agreeing
    (e.g. layers the nudge has not reached yet after k steps: both are zero up to round-off).
    """
    floor = noise_floor * max(float(g.double().pow(2).mean().sqrt()) for g in (*est.values(), *ref.values()))
    layers: dict[str, list[str]] = {}
    for name in est:
        layers.setdefault(layer_of[name], []).append(name)
    per_layer = {}
    for layer, names in layers.items():
        e = torch.cat([est[n].flatten() for n in names])
        r = torch.cat([ref[n].flatten() for n in names])
        if max(float(e.double().pow(2).mean().sqrt()), float(r.double().pow(2).mean().sqrt())) <= floor:
            per_layer[layer] = {"rel_rms_error": 0.0, "sign_agreement": 1.0, "angle_deg": 0.0}
            continue
        per_layer[layer] = {
            "rel_rms_error": relative_rms_error(e, r),
            "sign_agreement": sign_agreement(e, r),
            "angle_deg": angle_deg(e, r),
        }
    whole_e = torch.cat([est[n].flatten() for n in est])
    whole_r = torch.cat([ref[n].flatten() for n in est])
    return {"angle_deg": angle_deg(whole_e, whole_r), "layers": per_layer}


def saturation(state: list[torch.Tensor]) -> list[float]:
    """Fraction of each layer's units sitting exactly on a clamp boundary (s = 0 or s = 1), where σ' = 0."""
    return [float(((s == 0) | (s == 1)).double().mean()) for s in state]


def _norm(grads: Grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


def gdu_diagnostics(net: EPNet, free: list[torch.Tensor], residual: float, ref: Grads, cfg: EPConfig) -> dict:
    """Why EP and BPTT may disagree on this network: no fixed point, or units saturated at the fixed point.

    The agreement theorem needs a converged free phase and σ differentiable there as β → 0. A unit on a
    clamp boundary has σ' = 0, so BPTT's gradient through it is zero, while a nudge of finite β can push it
    off the boundary: EP then measures something BPTT cannot (the paper's initialisation, bias offset 0,
    leaves many output units at 0). Smaller β shrinks that gap; a bias offset > 0 moves units off it.
    """
    names = net.spec.layer_names
    sat = saturation(free)
    warnings = []
    if not residual < 1e-4:
        warnings.append(f"the free phase is not at a fixed point after T1 = {cfg.free_steps} steps (residual "
                        f"{residual:.2g}): raise --free-steps")
    if sat[-1] > 0:
        warnings.append(f"{100 * sat[-1]:.0f} % of the output units are saturated at the free fixed point (σ' = 0): "
                        f"BPTT's gradient through them is zero while a nudge of β = {cfg.beta} moves them; expect "
                        "disagreement that shrinks with β (try --beta 0.01) or a bias offset > 0 (--bias-offset 1)")
    return {"saturated_fraction": dict(zip(names, sat)), "bptt_grad_norm": _norm(ref), "warnings": warnings}


def gdu_report(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig, cep_lr: float = 1e-6) -> dict:
    """Compare two-phase EP, symmetric EP and C-EP with BPTT truncated to the last K free-phase steps.

    Refuses (GDUUndefinedError) where an angle would be 0/0: a gradient that is exactly zero.

    Example:
        >>> import torch
        >>> from analog_ep import EPConfig, EPNet, build_spec
        >>> net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0, schedule="synchronous"), seed=0).double()
        >>> x, y = torch.randn(8, 1, 12, 8, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> report = gdu_report(net, x, y, EPConfig(beta=0.001, free_steps=40, nudge_steps=6))
        >>> report["ep_symmetric"]["angle_deg"] < 1.0      # EP's update = BPTT's gradient as β → 0
        True
        >>> report["ep_two_phase"]["angle_deg"] < 1.0 and report["cep"]["angle_deg"] < 1.0
        True
    """
    ref = bptt(net, x, labels, cfg, set_grad=False)
    inputs = net.prepare(x)
    with torch.no_grad():
        free, trace = free_phase(net, inputs, cfg.free_steps)
    diagnostics = gdu_diagnostics(net, free, trace.final_residual, ref.grads, cfg)
    if diagnostics["bptt_grad_norm"] == 0:
        out = 100 * diagnostics["saturated_fraction"][net.spec.layer_names[-1]]
        raise GDUUndefinedError(f"BPTT's gradient is exactly zero, so there is no direction to agree with: {out:.0f} % "
                                "of the output units sit on a clamp boundary (σ' = 0) at the free fixed point, and "
                                "no loss gradient passes them. Start the units mid-range with --bias-offset 1 (the "
                                "default), or check a trained model")
    estimates = {
        "ep_two_phase": ep_two_phase(net, x, labels, cfg, set_grad=False).grads,
        "ep_symmetric": ep_symmetric(net, x, labels, cfg, set_grad=False).grads,
        "cep": cep_on_copy(net, x, labels, cfg, cep_lr).grads,
    }
    for name, grads in estimates.items():
        if _norm(grads) == 0:
            raise GDUUndefinedError(f"{name}'s update is exactly zero (the nudge moved no unit): "
                                    + "; ".join(diagnostics["warnings"] or [f"raise β above {cfg.beta}"]))
    report = {name: compare_grads(g, ref.grads, net.param_layer) for name, g in estimates.items()}
    report["config"] = {
        "beta": cfg.beta, "free_steps": cfg.free_steps, "nudge_steps": cfg.nudge_steps, "cep_lr": cep_lr,
        "batch": int(x.shape[0]), "free_phase_final_residual": trace.final_residual,
    }
    report["diagnostics"] = diagnostics
    return report


@torch.no_grad()
def _ep_step_grads(net: EPNet, inputs, free, target, beta: float, steps: int, symmetric: bool) -> list[Grads]:
    """EP's update after each nudged step k = 1..steps."""
    B = target.shape[0]
    if symmetric:
        inputs2, state = inputs.repeat(2), stack_states(free, free)
        betas = torch.full((2 * B, 1), beta, dtype=target.dtype, device=target.device)
        betas[B:] = -beta
        target2, scale = target.repeat(2, 1), -1.0 / (2 * beta * B)
    else:
        inputs2, state, betas, target2, scale = inputs, free, beta, target, -1.0 / (beta * B)
    coef = torch.full((2 * B,), scale, dtype=target.dtype, device=target.device)
    coef[B:] = -scale
    out = []
    for _ in range(steps):
        state = net.step(inputs2, state, betas, target2)
        pair = state if symmetric else stack_states(state, free)
        out.append(net.phi_param_grads(inputs2 if symmetric else inputs.repeat(2), pair, coef))
    return out


def gdu_curve(net: EPNet, x: torch.Tensor, labels: torch.Tensor, cfg: EPConfig) -> dict:
    """Per nudged step k: per-layer relative RMS error of EP (both variants) vs BPTT over the last k steps.

    Costs K BPTT passes of lengths 1..K from the free fixed point; meant for small networks.
    """
    target = one_hot_target(labels, net.spec.num_classes, net.weights[0].dtype)
    with torch.no_grad():
        inputs = net.prepare(x)
        free, _ = free_phase(net, inputs, cfg.free_steps)
    ep = {
        "ep_two_phase": _ep_step_grads(net, inputs, free, target, cfg.beta, cfg.nudge_steps, symmetric=False),
        "ep_symmetric": _ep_step_grads(net, inputs, free, target, cfg.beta, cfg.nudge_steps, symmetric=True),
    }
    names, params = zip(*net.named_parameters())
    curve: dict[str, dict[str, list[float]]] = {k: {} for k in ep}
    for k in range(1, cfg.nudge_steps + 1):
        with torch.enable_grad():
            inp = net.prepare(x)
            state = [s.detach() for s in free]
            for _ in range(k):
                state = net.step(inp, state)
            loss = mse_loss(state[-1], target)
            ref = dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)))
        for variant, per_step in ep.items():
            cmp = compare_grads(per_step[k - 1], ref, net.param_layer)
            for layer, stats in cmp["layers"].items():
                curve[variant].setdefault(layer, []).append(stats["rel_rms_error"])
    return {"steps": list(range(1, cfg.nudge_steps + 1)), "rel_rms_error": curve}


def plot_gdu_curve(curve: dict, path: str) -> None:
    """Paper-Fig.-2-style plot: relative error vs nudged step, one line per layer and EP variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(curve["rel_rms_error"])
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.6), sharey=True)
    for ax, variant in zip(axes, variants):
        for layer, errs in curve["rel_rms_error"][variant].items():
            ax.plot(curve["steps"], errs, marker=".", label=layer)
        ax.set_yscale("log")
        ax.set_title(f"{variant} vs BPTT (last k steps)")
        ax.set_xlabel("nudged step k")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative RMS error")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
