"""snntorch / norse neurons through the adapters: where their spike trains match the native IF units, and why not."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.convert import to_spiking
from spiking_ep.dynamics import WindowMean, spiking_free_phase
from spiking_ep.units.adapters import NorseLIFCoding, SnntorchLeakyCoding
from spiking_ep.units.neurons import IFCoding


def requires(module: str) -> pytest.MarkDecorator:
    """Skip a test only when the library it drives is missing (snntorch and norse are optional apart)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


needs_snntorch, needs_norse = requires("snntorch"), requires("norse")

T = 400


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def spike_trains(coding, rate: torch.Tensor, steps: int = T) -> torch.Tensor:
    state = coding.init(rate)
    out = []
    for _ in range(steps):
        spikes, state = coding.encode(rate, state)
        out.append(spikes)
    return torch.stack(out)


def random_rates(n: int = 300) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@needs_snntorch
def test_snntorch_leaky_without_leak_is_the_native_if_unit():
    rate = random_rates()
    native = spike_trains(IFCoding(v0=0.0), rate)
    snn = spike_trains(SnntorchLeakyCoding(beta=1.0, reset_mechanism="subtract"), rate)
    assert torch.equal(snn, native)  # no exact ties with random currents: identical spike times
    assert ((snn.sum(0) - T * rate).abs() <= 1).all()


@needs_snntorch
def test_snntorch_differs_from_native_only_at_exact_ties():
    """snntorch fires on mem > threshold, the native unit on v ≥ 1: a saturated unit loses its first spike."""
    rate = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    native = spike_trains(IFCoding(v0=0.0), rate, 40)
    snn = spike_trains(SnntorchLeakyCoding(), rate, 40)
    assert native[0, 0] == 1 and snn[0, 0] == 0
    assert ((native.sum(0) - snn.sum(0)) == 1).all()  # one spike later, the same rate


@needs_snntorch
def test_snntorch_reset_to_zero_loses_the_overshoot():
    rate = torch.tensor([0.1, 0.25, 0.4, 0.5, 0.7, 1.0], dtype=torch.float64)
    counts = spike_trains(SnntorchLeakyCoding(reset_mechanism="zero"), rate, 660).sum(0)
    expected = [1 / (math.floor(1 / p + 1e-9) + 1) for p in rate.tolist()]  # strict threshold: ⌊1/p⌋ + 1 steps
    torch.testing.assert_close(counts / 660, torch.tensor(expected, dtype=torch.float64), atol=2 / 660, rtol=0)


@needs_snntorch
def test_snntorch_leak_has_a_rheobase():
    beta = 0.9
    rate = random_rates()
    counts = spike_trains(SnntorchLeakyCoding(beta=beta), rate).sum(0)
    below = rate < (1 - beta) * 0.999  # the membrane settles at p / (1 − β) < threshold: never fires
    assert counts[below].sum() == 0
    assert (counts[~below] <= T * rate[~below] + 1).all() and (counts[rate > 0.2] > 0).all()


@needs_norse
@pytest.mark.parametrize("leak", [0.001, 0.01, 0.1])
def test_norse_lif_rates_match_the_closed_form(leak):
    """norse LIFCell with reset to zero and leak a: rate 1/k, k = first step with (p/a)(1 − (1−a)^k) > 1."""
    rate = torch.tensor([0.03, 0.15, 0.33, 0.45, 0.62, 0.8, 0.97], dtype=torch.float64)
    counts = spike_trains(NorseLIFCoding(leak=leak), rate, 1000).sum(0)
    for p, c in zip(rate.tolist(), counts.tolist()):
        k = next((k for k in range(1, 10_000) if (p / leak) * (1 - (1 - leak) ** k) > 1), None)
        expected = 0 if k is None else 1000 // k
        assert c == expected, (leak, p, c, expected)


@needs_norse
def test_norse_without_leak_is_reset_to_zero_if_and_loses_rate():
    rate = random_rates()
    norse_counts = spike_trains(NorseLIFCoding(leak=1e-6), rate).sum(0)
    native_counts = spike_trains(IFCoding(), rate).sum(0)
    assert (norse_counts <= native_counts).all()
    expected = torch.tensor([T // (math.floor(1 / p) + 1) for p in rate.tolist()], dtype=torch.float64)
    assert (norse_counts - expected).abs().max() <= 1


@needs_snntorch
@needs_norse
def test_the_same_network_runs_on_snntorch_units():
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, net.spec.seq_len, net.spec.dim, generator=g, dtype=torch.float64)
    inputs = net.prepare(x)
    means = {}
    for name, options in [("if", dict(v0=0.0)), ("snntorch", {}), ("norse", dict(leak=0.1))]:
        window = WindowMean(128)
        spiking_free_phase(to_spiking(net, name, tau=8, **options), inputs, 256, on_step=window)
        means[name] = window.mean()
    same = max(float((a - b).abs().max()) for a, b in zip(means["if"][1:], means["snntorch"][1:]))
    other = max(float((a - b).abs().max()) for a, b in zip(means["if"][1:], means["norse"][1:]))
    # the same dynamics up to the ties of saturated units (σ(u) = 1 exactly: snntorch fires one step later)
    assert same < 0.02
    assert other > 5 * same  # leak + reset to zero: another f-I curve, another fixed point
