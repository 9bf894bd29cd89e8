"""Spiking backend: units, spiking attention, the shared-Φ dynamics, conversion and evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from analog_ep.dynamics import free_phase, relax
from analog_ep.hopfield import hopfield_retrieve
from analog_ep.models import build_spec
from analog_ep.phi import EPNet, one_hot_target
from analog_ep.train.checkpoint import save_model
from spiking_ep.attention import SpikingAttention, attention_weights
from spiking_ep.convert import load_spiking, save_spiking_config, to_spiking
from spiking_ep.dynamics import WindowMean, init_state, new_record, run_phase, spiking_free_phase, spiking_step
from spiking_ep.evaluate import evaluate_spiking, plot_accuracy_vs_timesteps, timesteps_for_gap
from spiking_ep.units.base import trace_alpha
from spiking_ep.units.neurons import BernoulliCoding, IFCoding, IFState, SigmaDeltaCoding, if_step
from tests.helpers import trained_tiny_imdb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def tiny_net(model: str = "imdb", **options) -> EPNet:
    spec = build_spec(model, tiny=True, bias_offset=1.0, **options)
    return EPNet(spec, seed=0).double()


def gaussian_x(spec, batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- units
def test_if_count_tracks_integrated_rate_within_one_spike():
    g = torch.Generator().manual_seed(0)
    rates = torch.rand(200, 500, generator=g, dtype=torch.float64)  # time-varying σ(u), 500 units
    rates[:, :50] = 1.0
    rates[:, 50:100] = 0.0
    coding = IFCoding()
    state = coding.init(rates[0])
    count = torch.zeros(500, dtype=torch.float64)
    for t in range(200):
        spikes, state = coding.encode(rates[t], state)
        assert set(spikes.unique().tolist()) <= {0.0, 1.0}
        count += spikes
        assert (count - rates[: t + 1].sum(0)).abs().max() <= 1.0  # at every t, not only at the end
    assert torch.equal(count[:50], torch.full((50,), 200.0, dtype=torch.float64))
    assert count[50:100].sum() == 0


def test_if_step_is_reset_by_subtraction():
    spikes, state = if_step(torch.tensor([0.7]), IFState(torch.tensor([0.6])))
    assert spikes.item() == 1.0 and state.v.item() == pytest.approx(0.3)  # overshoot kept


def test_bernoulli_rate_is_unbiased():
    p = torch.linspace(0, 1, 11, dtype=torch.float64)
    coding = BernoulliCoding(seed=3)
    state = coding.init(p)
    T = 4000
    count = torch.zeros_like(p)
    for _ in range(T):
        spikes, state = coding.encode(p, state)
        count += spikes
    sd = (p * (1 - p) / T).sqrt()
    assert ((count / T - p).abs() <= 4 * sd + 1e-12).all()


def test_sigma_delta_tracks_the_value_and_goes_silent():
    coding = SigmaDeltaCoding(threshold=1 / 16)
    g = torch.Generator().manual_seed(1)
    value = torch.rand(300, generator=g, dtype=torch.float64)
    state, trace = coding.init(value), torch.zeros_like(value)
    spikes, state = coding.encode(value, state)
    trace = coding.decode(trace, spikes, 1.0)
    assert (trace - value).abs().max() <= 1 / 32 + 1e-12
    spikes, state = coding.encode(value, state)  # unchanged value: no spikes at all
    assert spikes.abs().sum() == 0
    moved = value + 0.2
    spikes, state = coding.encode(moved, state)
    assert spikes.abs().sum() > 0 and (coding.decode(trace, spikes, 1.0) - moved).abs().max() <= 1 / 32 + 1e-12


def test_trace_schedule_is_a_running_mean_then_a_time_constant():
    assert [trace_alpha(t, 4) for t in range(6)] == [1.0, 0.5, 1 / 3, 0.25, 0.25, 0.25]
    assert trace_alpha(99, None) == pytest.approx(0.01)


# ---------------------------------------------------------------- attention
@pytest.mark.parametrize("masked", [False, True])
def test_attention_weights_give_the_analog_retrieval(masked):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 6, 4, generator=g)
    mask = torch.rand(3, 2, 6, generator=g) > 0.3 if masked else None
    if masked:
        mask[0, 0] = False  # a sequence with no real token retrieves zeros
    w = attention_weights(q, k, 0.7, mask)
    torch.testing.assert_close(w @ k, hopfield_retrieve(q, k, 0.7, mask))


@pytest.mark.parametrize("mode", ["herd", "sample"])
def test_spiking_attention_time_average_is_the_retrieval(mode):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(4, 1, 6, 8, generator=g, dtype=torch.float64), torch.randn(4, 1, 6, 8, generator=g,
                                                                                   dtype=torch.float64)
    target = hopfield_retrieve(q, k, 0.5)
    att = SpikingAttention(mode, seed=0)
    state = att.init(q, k)
    total, errors = torch.zeros_like(target), {}
    for t in range(1, 2049):
        sent, events, state = att.step(q, k, 0.5, None, state)
        assert events == 4 * 6  # one winner per row and step
        if t <= 3:  # every row sends one of its stored tokens
            assert ((sent.unsqueeze(-2) - k.unsqueeze(-3)).abs().sum(-1) == 0).any(-1).all()
        total += sent
        if t in (64, 2048):
            errors[t] = float((total / t - target).abs().max())
    assert errors[2048] < errors[64]
    assert errors[2048] < (0.02 if mode == "herd" else 0.25)


# ---------------------------------------------------------------- dynamics = the shared Φ
@dataclass(frozen=True)
class RatePassthrough:
    """A test 'coding' that sends the rate itself: with τ = 1 and dense attention, spiking = analog."""

    name: str = "passthrough"
    signed: bool = False

    def init(self, like):
        return None

    def encode(self, rate, state):
        return rate, state

    def decode(self, trace, spikes, alpha):
        return trace + alpha * (spikes - trace)


@pytest.mark.parametrize("model", ["imdb", "snli", "mlp"])
@pytest.mark.parametrize("schedule", ["alternating", "synchronous"])
def test_spiking_dynamics_are_the_analog_dynamics_when_spikes_carry_the_rate(model, schedule):
    net = tiny_net(model, schedule=schedule)
    x = gaussian_x(net.spec, 3)
    y = torch.tensor([0, 1, 1])
    snet = to_spiking(net, attention="dense", tau=1)
    snet.coding = RatePassthrough()
    inputs = net.prepare(x)
    target = one_hot_target(y, net.spec.num_classes, torch.float64)
    analog, _ = relax(net, inputs, net.zero_state(3), 7)
    spiking = spiking_free_phase(snet, inputs, 7)
    analog_nudged, _ = relax(net, inputs, analog, 3, beta=0.3, target=target)
    spiking_nudged = run_phase(snet, inputs, spiking, 3, beta=0.3, target=target, phase="nudge")
    for a, s in zip(analog + analog_nudged, spiking.traces + spiking_nudged.traces):
        torch.testing.assert_close(s, a, rtol=0, atol=1e-12)


def test_event_driven_current_equals_layer_drive_of_traces():
    """Each spike adds a weight column to a filtered synaptic current: that current is layer_drive(traces)."""
    net = tiny_net("mlp", hidden=(12, 9))
    inputs = net.prepare(gaussian_x(net.spec, 2))
    snet = to_spiking(net, "bernoulli", tau=5)
    state = init_state(snet, inputs)
    n = 1  # the middle layer: bottom-up from layer 0, top-down from layer 2
    current = torch.zeros(2, 9, dtype=torch.float64)
    W_up, W_down = net.weights[1], net.weights[2]
    for _ in range(40):
        new, spikes, _ = spiking_step(snet, inputs, state)
        alpha = trace_alpha(state.t, snet.tau)
        # the synapses of layer 1 see the spikes the traces were built from: layer 0 and 2 at this step
        events = torch.zeros_like(current)
        for b in range(2):
            for j in spikes[0][b].nonzero().flatten():
                events[b] += W_up[:, j]
            for j in spikes[2][b].nonzero().flatten():
                events[b] += W_down[j, :]
        current = current + alpha * (events - current)
        state = new
    drive = net.layer_drive(inputs, state.traces, n) - net.biases[1]
    torch.testing.assert_close(current, drive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("coding", ["if", "bernoulli", "sigma_delta"])
@pytest.mark.parametrize("model", ["imdb", "snli"])
def test_spiking_free_phase_reaches_the_analog_fixed_point(coding, model):
    net = tiny_net(model)
    inputs = net.prepare(gaussian_x(net.spec, 16))
    analog, trace = free_phase(net, inputs, 200)
    assert trace.final_residual < 1e-8
    snet = to_spiking(net, coding, tau=8)
    errors = {}
    for T in (16, 64, 512):  # rates over the second half of the run, as the evaluation reads them
        window = WindowMean(T // 2)
        spiking_free_phase(snet, inputs, T, on_step=window)
        errors[T] = max(float((s - a).abs().mean()) for s, a in zip(window.mean()[1:], analog[1:]))
    assert errors[64] < errors[16]
    if coding == "sigma_delta":  # exact up to the quantum θ = 1/16 after a few steps: a floor, not a trend
        assert errors[512] <= errors[64] + 1e-3 and errors[512] < 0.01
    else:
        assert errors[512] < errors[64] and errors[512] < {"if": 0.01, "bernoulli": 0.04}[coding]


def test_spike_record_counts():
    net = tiny_net("imdb")
    x = gaussian_x(net.spec, 5)
    snet = to_spiking(net, "if")
    record = new_record(snet, samples=5)
    spiking_free_phase(snet, net.prepare(x), 20, record=record)
    spec = net.spec
    L, d, (h1, h2, out) = spec.seq_len, spec.dim, spec.layers
    assert record.layer_names == ["proj", "fc1", "fc2", "out"]
    assert record.fan_out == [0, L * d + h2, h1 + out, h2]
    assert record.layer_units == [L, h1, h2, out]
    assert record.dense_macs_per_step == {"attention_scores": L * L * d, "attention_values": L * d * h1}
    assert record.dense_macs_per_sample == {"input_current": L * d * d}
    assert record.steps("free") == 20
    per_sample = record.spikes_per_sample("free")
    assert per_sample["proj"] == 20 * L  # one winner per row and step
    rates = record.firing_rates("free")
    assert all(0 <= r <= 1 for r in rates.values())
    ops = record.synaptic_ops_per_sample("free")
    assert ops == pytest.approx(sum(per_sample[n] * f for n, f in zip(record.layer_names, record.fan_out)))
    assert json.dumps(record.to_dict())


# ---------------------------------------------------------------- conversion and evaluation
def test_convert_from_a_saved_run_and_back(tmp_path):
    net = tiny_net("snli").float()
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", net)
    snet = to_spiking(run, "sigma_delta", threshold=1 / 32)
    for (name, p), q in zip(net.named_parameters(), snet.net.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert snet.net.spec == net.spec and snet.attention.mode == "herd"
    save_spiking_config(snet, run)
    again = load_spiking(run)
    assert again.config() == snet.config() and again.coding == snet.coding


@pytest.fixture(scope="module")
def trained_tiny():
    return trained_tiny_imdb()


@pytest.mark.parametrize("coding, options", [("if", {"tau": 8}), ("sigma_delta", {})])
def test_trained_model_converts_with_spiking_accuracy_close_to_analog(trained_tiny, coding, options, tmp_path):
    net, (x, y) = trained_tiny
    result = evaluate_spiking(net, [(x[:100], y[:100]), (x[100:], y[100:])], timesteps=(16, 256), coding=coding,
                              **options)
    analog = result["analog"]["accuracy"]
    assert analog >= 0.95
    best = result["timesteps"]["256"]
    assert best["accuracy"] >= analog - 0.02 and best["agreement"] >= 0.97
    assert best["spikes_per_sample"] > 0 and set(best["firing_rates"]) == {"proj", "fc1", "fc2", "out"}
    early, late = result["timesteps"]["16"]["distance_to_analog"], best["distance_to_analog"]
    assert late["fc1"] < early["fc1"] and late["out"] < early["out"]
    assert timesteps_for_gap(result, 0.02) in (16, 256)
    png = plot_accuracy_vs_timesteps(result, analog, tmp_path / "acc.png")
    assert png.stat().st_size > 1000
    json.dumps(result)


# ---------------------------------------------------------------- command line
def test_cli_convert_and_spiking_eval(trained_tiny, tmp_path, capsys):
    from analog_ep.cli import main

    net, (x, y) = trained_tiny
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", net)
    torch.save({"x": x[:64], "y": y[:64]}, tmp_path / "test.pt")
    assert main(["convert", str(run), "--coding", "if", "--tau", "8", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert json.loads((run / "spiking.json").read_text())["tau"] == 8.0 and written["coding"] == "if"
    assert main(["spiking-eval", str(run), "--data", str(tmp_path / "test.pt"), "--timesteps", "8,32", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["coding"] == "if" and set(result["timesteps"]) == {"8", "32"}
    assert result["samples"] == 64 and (run / "plots" / "spiking_accuracy.png").is_file()
    assert main(["spiking-eval", str(run), "--synthetic", "16", "--coding", "sigma_delta", "--timesteps", "16"]) == 0
    assert "sigma_delta" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["spiking-eval", "{run}", "--timesteps", "8"], "no config.json"),
    (["spiking-eval", "{run}", "--synthetic", "4", "--timesteps", "1,x"], "--timesteps"),
    (["convert", "{run}", "--coding", "if", "--threshold", "0.1"], "--threshold"),
    (["convert", "{run}/nowhere"], "no checkpoint"),
])
def test_cli_errors_are_clear(tmp_path, capsys, argv, message):
    from analog_ep.cli import main

    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", tiny_net("mlp").float())
    assert main([a.format(run=run) for a in argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["convert", "spiking-eval", "compare", "export-nir", "demo", "spiking-train"])
def test_every_spiking_command_teaches_by_example(command, capsys):
    from analog_ep.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    usage, examples = text.split("examples:")
    assert f"usage: seqep {command}" in usage and f"seqep {command} " in examples
