"""Autograd on Φ: the test oracle for the analytic gradients, and the "reference-equivalent" mode.

This is the published algorithm as the paper's code runs it: Φ written out once, ∂Φ/∂s and ∂Φ/∂θ
taken by autograd at every step, phases one after another. Slow by design; never used for training.
"""

from __future__ import annotations

import torch

from analog_ep.hopfield import hopfield_retrieve
from analog_ep.phi import EPNet, State


def phi_value(
    net: EPNet,
    x: torch.Tensor,
    state: State,
    beta: float = 0.0,
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """Φ^β summed over the batch, written directly from the definition (independent of EPNet.drives)."""
    spec = net.spec
    x = x.to(net.weights[0].dtype)
    total = x.new_zeros(())
    if spec.num_projections:
        proj, fc = state[0], state[1:]
        for p, pr in enumerate(spec.projections):
            xq = x[:, pr.query_stream]  # (B, L, d)
            total = total + (proj[:, p] * (xq @ net.proj_weight[p].t())).sum()
        bottom = proj.reshape(proj.shape[0], -1)
    else:
        fc = state
        bottom = x.reshape(x.shape[0], -1)
    for n, h in enumerate(fc):
        total = total + (h * (bottom @ net.weights[n].t() + net.biases[n])).sum()
        bottom = h
    if target is not None and beta != 0.0:
        total = total - beta * 0.5 * ((fc[-1] - target) ** 2).sum()
    return total


def autograd_state_grads(net: EPNet, x: torch.Tensor, state: State, beta: float = 0.0, target=None) -> State:
    """∂Φ^β/∂s by autograd."""
    leaves = [s.detach().requires_grad_(True) for s in state]
    with torch.enable_grad():
        phi = phi_value(net, x, leaves, beta, target)
        return list(torch.autograd.grad(phi, leaves))


def autograd_param_grads(net: EPNet, x: torch.Tensor, state: State) -> dict[str, torch.Tensor]:
    """∂Φ/∂θ (summed over the batch) by autograd."""
    names, params = zip(*net.named_parameters())
    with torch.enable_grad():
        phi = phi_value(net, x, [s.detach() for s in state])
        grads = torch.autograd.grad(phi, params)
    return dict(zip(names, grads))


def reference_step(net: EPNet, x: torch.Tensor, state: State, beta: float = 0.0, target=None) -> State:
    """One synchronous step with ∂Φ/∂s taken by autograd, as the paper's reference code does."""
    spec = net.spec
    grads = autograd_state_grads(net, x, state, beta, target)
    new: State = []
    offset = 0
    if spec.num_projections:
        keys = x[:, [p.key_stream for p in spec.projections]].to(grads[0].dtype)
        mask = (keys != 0).any(-1) if spec.mask_padding else None
        if spec.attention:
            new.append(hopfield_retrieve(grads[0], keys, spec.hopfield_gamma, mask))
        else:
            new.append(net.activation(grads[0]))
        offset = 1
    new.extend(net.activation(g) for g in grads[offset:])
    return [s.detach() for s in new]


def reference_ep_symmetric(
    net: EPNet, x: torch.Tensor, labels: torch.Tensor, beta: float, free_steps: int, nudge_steps: int
) -> dict[str, torch.Tensor]:
    """Symmetric EP exactly as the reference code runs it: autograd every step, +β then −β in turn."""
    from analog_ep.phi import one_hot_target

    target = one_hot_target(labels, net.spec.num_classes, net.weights[0].dtype)
    state = net.zero_state(x.shape[0])
    for _ in range(free_steps):
        state = reference_step(net, x, state)
    free = state
    ends = []
    for b in (beta, -beta):
        state = [s.clone() for s in free]
        for _ in range(nudge_steps):
            state = reference_step(net, x, state, b, target)
        ends.append(autograd_param_grads(net, x, state))
    scale = -1.0 / (2 * beta * x.shape[0])
    return {k: scale * (ends[0][k] - ends[1][k]) for k in ends[0]}
