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
    x = x.to(net.weights[0].dtype) * spec.input_scale
    total = x.new_zeros(())
    if spec.num_projections:
        proj, fc = state[0], state[1:]
        for p, pr in enumerate(spec.projections):
            if spec.pool_queries:  # learned query patterns ξ: Φ ∋ Σ_j ⟨ξ_j, s_j⟩
                total = total + (proj[:, p] * net.proj_query[p]).sum()
                continue
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
    """One step with ∂Φ/∂s taken by autograd (as the paper's code does), on the net's update schedule."""
    spec = net.spec
    scaled = x * spec.input_scale
    keys = scaled[:, [p.key_stream for p in spec.projections]].to(state[-1].dtype) if spec.num_projections else None
    mask = (keys != 0).any(-1) if spec.mask_padding and keys is not None else None

    def update(n: int, grad: torch.Tensor) -> torch.Tensor:
        if spec.num_projections and n == 0:
            return hopfield_retrieve(grad, keys, spec.hopfield_gamma, mask) if spec.attention else net.activation(grad)
        return net.activation(grad)

    if spec.schedule == "synchronous":
        grads = autograd_state_grads(net, x, state, beta, target)
        return [update(n, g).detach() for n, g in enumerate(grads)]
    new = [s.detach() for s in state]
    for parity in (0, 1):
        grads = autograd_state_grads(net, x, new, beta, target)
        for n in range(parity, len(new), 2):
            new[n] = update(n, grads[n]).detach()
    return new


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
