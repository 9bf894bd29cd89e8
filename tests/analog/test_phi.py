"""Φ's analytic derivatives against autograd, and the Hopfield projection invariants."""

import subprocess
import sys

import pytest
import torch

from analog_ep import reference
from analog_ep.hopfield import hopfield_retrieve
from analog_ep.models import build_spec
from analog_ep.phi import EPNet, GraphSpec, Projection
from tests.helpers import REPO, random_inputs


def random_state(net: EPNet, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(s.shape, generator=g, dtype=s.dtype) for s in net.zero_state(batch)]


def test_state_gradients_match_autograd(tiny_net64):
    x, _ = random_inputs(tiny_net64.spec, 4)
    state = random_state(tiny_net64, 4)
    analytic = tiny_net64.drives(tiny_net64.prepare(x), state)
    oracle = reference.autograd_state_grads(tiny_net64, x, state)
    for a, o in zip(analytic, oracle):
        torch.testing.assert_close(a, o, rtol=1e-12, atol=1e-12)


def test_param_gradients_match_autograd(tiny_net64):
    x, _ = random_inputs(tiny_net64.spec, 4)
    state = random_state(tiny_net64, 4)
    coef = torch.ones(4, dtype=torch.float64)
    analytic = tiny_net64.phi_param_grads(tiny_net64.prepare(x), state, coef)
    oracle = reference.autograd_param_grads(tiny_net64, x, state)
    assert analytic.keys() == oracle.keys()
    for name in oracle:
        torch.testing.assert_close(analytic[name], oracle[name], rtol=1e-12, atol=1e-12)


def test_signed_param_gradients_are_a_contrast(tiny_net64):
    """coef = (+1, −1) over a stacked batch gives ∂Φ/∂θ(a) − ∂Φ/∂θ(b) in one product."""
    x, _ = random_inputs(tiny_net64.spec, 3)
    a, b = random_state(tiny_net64, 3, 1), random_state(tiny_net64, 3, 2)
    inputs = tiny_net64.prepare(x)
    ones = torch.ones(3, dtype=torch.float64)
    ga = tiny_net64.phi_param_grads(inputs, a, ones)
    gb = tiny_net64.phi_param_grads(inputs, b, ones)
    stacked = [torch.cat([sa, sb]) for sa, sb in zip(a, b)]
    g = tiny_net64.phi_param_grads(inputs.repeat(2), stacked, torch.cat([ones, -ones]))
    for name in g:
        torch.testing.assert_close(g[name], ga[name] - gb[name])


def test_phi_value_matches_reference(tiny_net64):
    x, _ = random_inputs(tiny_net64.spec, 4)
    state = random_state(tiny_net64, 4)
    ours = tiny_net64.phi(tiny_net64.prepare(x), state).sum()
    torch.testing.assert_close(ours, reference.phi_value(tiny_net64, x, state))


@pytest.mark.parametrize("schedule", ["alternating", "synchronous"])
@pytest.mark.parametrize("model", ["imdb", "snli"])
def test_step_matches_autograd_reference_step(model, schedule):
    net = EPNet(build_spec(model, tiny=True, schedule=schedule, mask_padding=True), seed=0).double()
    x, y = random_inputs(net.spec, 3)
    x[:, :, -2:] = 0  # padding tokens
    target = torch.nn.functional.one_hot(y, net.spec.num_classes).double()
    state = random_state(net, 3)
    ours = net.step(net.prepare(x), state, 0.3, target)
    oracle = reference.reference_step(net, x, state, 0.3, target)
    for a, o in zip(ours, oracle):
        torch.testing.assert_close(a, o)


def test_projection_rows_are_convex_combinations_of_keys():
    """s¹_t = softmax(·) K: solve for the mixing weights and check they are a probability vector."""
    net = EPNet(build_spec("snli", tiny=True), seed=0).double()  # L=6 keys in d=8: independent rows
    x, _ = random_inputs(net.spec, 2)
    state = net.zero_state(2)
    inputs = net.prepare(x)
    for _ in range(5):
        state = net.step(inputs, state)
    proj, keys = state[0], inputs.keys  # (B,P,L,d)
    weights = torch.linalg.lstsq(keys.transpose(-1, -2), proj.transpose(-1, -2)).solution.transpose(-1, -2)
    assert torch.allclose(weights.sum(-1), torch.ones_like(weights.sum(-1)), atol=1e-9)
    assert weights.min() > -1e-9
    torch.testing.assert_close(weights @ keys, proj)


def test_hopfield_mask_ignores_padding_and_empty_sequences_give_zeros():
    keys = torch.randn(2, 5, 4, dtype=torch.float64)
    keys[0, 3:] = 0
    keys[1] = 0
    mask = (keys != 0).any(-1)
    query = torch.randn(2, 5, 4, dtype=torch.float64)
    out = hopfield_retrieve(query, keys, 0.5, mask)
    expected0 = torch.softmax(0.5 * query[0] @ keys[0, :3].t(), -1) @ keys[0, :3]
    torch.testing.assert_close(out[0], expected0)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_bad_input_shape_is_a_clear_error():
    net = EPNet(build_spec("imdb", tiny=True))
    with pytest.raises(ValueError, match=r"input must have shape \(batch, 1, 12, 8\)"):
        net.prepare(torch.zeros(2, 12, 8))


def test_spec_round_trips_through_dict():
    spec = build_spec("snli", tiny=True, mask_padding=True, bias_offset=0.5)
    assert GraphSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("bad", [dict(layers=()), dict(layers=(4, 0)), dict(schedule="random"),
                                 dict(pool_queries=2, attention=False), dict(pool_queries=2, projections=())])
def test_spec_rejects_bad_values(bad):
    kwargs = dict(num_streams=1, seq_len=3, dim=2, layers=(4, 2), projections=(Projection(0, 0),))
    kwargs.update(bad)
    with pytest.raises(ValueError):
        GraphSpec(**kwargs)


def test_input_scale_multiplies_the_word_vectors_everywhere():
    scaled = EPNet(build_spec("imdb", tiny=True, input_scale=2.5), seed=0).double()
    plain = EPNet(build_spec("imdb", tiny=True), seed=0).double()
    x, _ = random_inputs(scaled.spec, 3)
    state = random_state(scaled, 3)
    a, b = scaled.prepare(x), plain.prepare(2.5 * x)
    torch.testing.assert_close(a.query_drive, b.query_drive)
    torch.testing.assert_close(a.keys, b.keys)
    torch.testing.assert_close(scaled.phi(a, state).sum(), reference.phi_value(scaled, x, state))
    for u, v in zip(scaled.step(a, state), reference.reference_step(scaled, x, state)):
        torch.testing.assert_close(u, v)


def test_the_exact_path_never_loads_the_fast_path():
    """Φ, its gradients and a relaxation step run without importing `analog_ep.fast` (nor its native kernels):
    the fast path is loaded only where `Inputs.lowp` asks for it."""
    code = (
        "import sys, torch\n"
        "from analog_ep.models import build_spec\n"
        "from analog_ep.phi import EPNet\n"
        "net = EPNet(build_spec('snli', tiny=True), seed=0)\n"
        "inputs = net.prepare(torch.randn(2, 2, 6, 8))\n"
        "free = net.step(inputs, net.zero_state(2))\n"
        "nudge_inputs, start = net.nudge_start(inputs, free, times=2)\n"
        "net.symmetric_contrast(nudge_inputs, net.full_state(nudge_inputs, start), 1.0)\n"
        "print(sorted(m for m in sys.modules if m.startswith('analog_ep.fast')))\n"
        "net.prepare(torch.randn(2, 2, 6, 8), precision='bf16')\n"
        "print('analog_ep.fast.lowp_phi' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "True"]
