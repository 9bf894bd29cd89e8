"""How far the fast path's EP update is from the numbers EP defines (the exact path in float64)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from analog_ep.bench.shapes import Shape, bench_batch, make_net
from analog_ep.estimators import EPConfig, ep_symmetric
from analog_ep.gdu import angle_deg


def flat_grads(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten().double() for k in sorted(grads)])


def check_fidelity(shape: Shape, batch: int, cfg: EPConfig, seed: int = 0, inputs: str = "random") -> dict:
    """Angle between the fast path's EP update and the float64 EP update (same net, batch, steps).

    The float64 update is the exact path in float64 without early exit, unfolded: the numbers EP defines.
    Also reported: the exact float32 path against the same float64 update (the floor fp32 itself sets).
    """
    net = make_net(shape)
    x, y = bench_batch(shape, batch, inputs, seed=seed + 2)
    exact = replace(cfg, precision="fp32", tol=None, nudge_tol=None, fold=False)
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
