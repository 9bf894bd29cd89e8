"""Learning from spikes: spike-driven symmetric EP and C-EP converge to their analog estimates as T grows."""

from __future__ import annotations

import pytest
import torch

from analog_ep.estimators import EPConfig, ep_symmetric, ep_two_phase
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.convert import to_spiking
from spiking_ep.learning import (
    SpikingEPConfig,
    angle_degrees,
    per_layer_angles,
    spiking_cep,
    spiking_cep_on_copy,
    spiking_ep_symmetric,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def problem():
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, net.spec.seq_len, net.spec.dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=g)
    return net, x, y


def test_spiking_symmetric_ep_approaches_analog_ep_as_T_grows(problem):
    net, x, y = problem
    analog = ep_symmetric(net, x, y, EPConfig(0.1, 200, 100), set_grad=False).grads
    snet = to_spiking(net, "if", tau=16)
    angles = {}
    for T in (64, 256, 1024):
        est = spiking_ep_symmetric(snet, x, y, SpikingEPConfig(0.1, T, T // 2, window=T // 4), set_grad=False)
        angles[T] = angle_degrees(est.grads, analog)
        assert est.grads.keys() == analog.keys()
    assert angles[1024] < angles[256] < angles[64]
    assert angles[1024] < 12.0
    assert est.record.steps("free") == 1024 and est.record.steps("nudge") == 512


def test_with_dense_attention_every_layer_converges(problem):
    """The winner-take-all attention's sampling noise is what limits the first two layers (docs/spiking.md)."""
    net, x, y = problem
    analog = ep_symmetric(net, x, y, EPConfig(0.1, 200, 100), set_grad=False).grads
    snet = to_spiking(net, "if", tau=32, attention="dense")
    est = spiking_ep_symmetric(snet, x, y, SpikingEPConfig(0.1, 2048, 1024, window=512), set_grad=False)
    layers = per_layer_angles(net, est.grads, analog)
    assert max(layers.values()) < 10.0, layers


def test_stdp_like_spike_rule_also_converges(problem):
    """spike × partner trace (event-driven) is noisier than trace × trace, but has the same limit."""
    net, x, y = problem
    analog = ep_symmetric(net, x, y, EPConfig(0.1, 200, 100), set_grad=False).grads
    snet = to_spiking(net, "if", tau=16)
    angles = {T: angle_degrees(spiking_ep_symmetric(snet, x, y, SpikingEPConfig(0.1, T, T // 2, window=T // 4,
                                                                                hebbian="spike"),
                                                    set_grad=False).grads, analog) for T in (256, 2048)}
    assert angles[2048] < angles[256] and angles[2048] < 30.0
    with pytest.raises(ValueError, match="spike"):
        spiking_ep_symmetric(to_spiking(net, "sigma_delta"), x, y, SpikingEPConfig(hebbian="spike"))


def test_spiking_cep_approaches_analog_ep_as_T_grows(problem):
    net, x, y = problem
    two_phase = ep_two_phase(net, x, y, EPConfig(0.5, 200, 100), set_grad=False).grads
    snet = to_spiking(net, "if", tau=16, attention="dense")
    angles = {T: angle_degrees(spiking_cep_on_copy(snet, x, y, SpikingEPConfig(0.5, T, T // 2), 1e-9).grads,
                               two_phase) for T in (256, 2048)}
    assert angles[2048] < angles[256] and angles[2048] < 5.0


def test_spiking_cep_moves_the_weights_locally_at_every_step(problem):
    net, x, y = problem
    twin = to_spiking(EPNet(net.spec).double(), "if")
    twin.net.load_state_dict(net.state_dict())
    before = {n: p.clone() for n, p in twin.net.named_parameters()}
    est = spiking_cep(twin, x, y, SpikingEPConfig(0.5, 64, 16), lrs=1e-3)
    assert est.applied
    for name, p in twin.net.named_parameters():
        torch.testing.assert_close(p - before[name], -1e-3 * est.grads[name])
