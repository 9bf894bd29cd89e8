"""A diverged network stops with a diagnostic (layer, phase, step) instead of training on NaN."""

import pytest
import torch

from analog_ep.dynamics import free_phase, relax
from analog_ep.errors import NumericalError
from analog_ep.estimators import EPConfig, make_estimator
from tests.helpers import random_inputs, tiny_net


@pytest.mark.parametrize("track", [True, False])
def test_a_nan_weight_stops_the_free_phase_naming_layer_and_step(track):
    net = tiny_net("imdb")
    with torch.no_grad():
        net.weights[1][0, 0] = float("nan")  # fc1 -> fc2
    x, _ = random_inputs(net.spec, 2)
    expected = r"free phase diverged: layer \w+ holds NaN/Inf at step \d+; the parameters weights.1 hold.*train.lrs"
    with pytest.raises(NumericalError, match=expected):
        free_phase(net, net.prepare(x), 20, track=track)


def test_a_nan_target_stops_the_nudged_phase_and_blames_the_data():
    net = tiny_net("mlp")
    x, y = random_inputs(net.spec, 2)
    inputs = net.prepare(x)
    state, _ = free_phase(net, inputs, 20)
    target = torch.nn.functional.one_hot(y, net.spec.num_classes).double()
    target[0, 0] = float("nan")
    with pytest.raises(NumericalError, match="nudged phase diverged: layer .* came with the inputs or the target"):
        relax(net, inputs, state, 5, beta=0.5, target=target)


def test_an_estimator_on_a_diverged_network_raises_instead_of_returning_nan_gradients():
    net = tiny_net("snli")
    with torch.no_grad():
        net.weights[0].fill_(float("inf"))
    x, y = random_inputs(net.spec, 2)
    with pytest.raises(NumericalError):
        make_estimator("ep_symmetric", EPConfig(0.1, 10, 4))(net, x, y)


def test_a_healthy_network_is_untouched():
    net = tiny_net("imdb")
    x, _ = random_inputs(net.spec, 2)
    state, trace = free_phase(net, net.prepare(x), 30, track=False)
    assert all(torch.isfinite(s).all() for s in state) and trace.steps == 30
