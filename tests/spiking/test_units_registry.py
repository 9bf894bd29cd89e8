"""The coding registry: one table of unit models by name, which users extend with their own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from analog_ep.errors import ConfigError
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.convert import to_spiking
from spiking_ep.dynamics import spiking_free_phase
from spiking_ep.units import coding_names, make_coding, register_coding, unregister_coding
from spiking_ep.units.neurons import BernoulliCoding, IFCoding, SigmaDeltaCoding

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_codings_build_by_name():
    assert coding_names()[:5] == ("if", "bernoulli", "sigma_delta", "snntorch", "norse")
    assert make_coding("if") == IFCoding()
    assert make_coding("bernoulli", seed=3) == BernoulliCoding(seed=3)
    assert make_coding("sigma_delta", threshold=0.5) == SigmaDeltaCoding(threshold=0.5)


def test_unknown_coding_and_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="unknown coding 'lif'.*register_coding"):
        make_coding("lif")
    with pytest.raises(ConfigError, match="bad options for coding 'if'"):
        make_coding("if", tau=3)
    net = EPNet(build_spec("mlp", tiny=True), seed=0)
    with pytest.raises(ConfigError, match="unknown coding"):
        to_spiking(net, coding="lif")


@dataclass(frozen=True)
class SilentCoding(IFCoding):
    """A user's unit model: never spikes (so every trace stays at 0)."""

    seed: int = -1
    name: str = "silent"

    def encode(self, rate, state):
        return torch.zeros_like(rate), state


def test_a_registered_coding_runs_the_network_with_its_defaults():
    register_coding("silent", SilentCoding, attention="sample", seeded=True)
    try:
        with pytest.raises(ConfigError, match="already registered"):
            register_coding("silent", SilentCoding)
        snet = to_spiking(EPNet(build_spec("imdb", tiny=True), seed=0), coding="silent", seed=7)
        assert snet.attention.mode == "sample"  # the entry's default winner rule
        assert snet.coding == SilentCoding(seed=7)  # seeded: the network's seed reaches the factory
        x = torch.randn(2, 1, 12, 8, generator=torch.Generator().manual_seed(0))
        state = spiking_free_phase(snet, snet.net.prepare(x), 4)
        assert all(float(t.abs().sum()) == 0 for t in state.traces[1:])  # FC traces never moved
    finally:
        unregister_coding("silent")
    assert "silent" not in coding_names()


def test_a_factory_that_returns_no_coding_is_refused():
    register_coding("broken", lambda: object())
    try:
        with pytest.raises(ConfigError, match="lacks the Coding members"):
            make_coding("broken")
    finally:
        unregister_coding("broken")
