"""Event-driven attention (`--attention event`): the rows are the exact retrieval when every step is an
event, are held between events, are decided per sample, and cost what the counting says."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.attention import SpikingAttention, attention_weights
from spiking_ep.convert import to_spiking
from spiking_ep.dynamics import init_state, new_record, spiking_step
from spiking_ep.energy.counting import spiking_counts

pytestmark = pytest.mark.usefixtures("one_thread")


def small_net(**options) -> EPNet:
    spec = build_spec("imdb", seq_len=6, dim=4, hidden=(8, 4), bias_offset=1.0, **options)
    return EPNet(spec, seed=0).double()


def event_net(net: EPNet, drift: float):
    snet = to_spiking(net, "sigma_delta", attention="event")
    return replace(snet, attention=replace(snet.attention, drift=drift))


def inputs_of(net: EPNet, batch: int = 5):
    x = torch.randn(batch, 1, net.spec.seq_len, net.spec.dim, generator=torch.Generator().manual_seed(1)).double()
    return net.prepare(x)


def exact_retrieval(snet, inputs, traces) -> torch.Tensor:
    query = snet.net.layer_drive(inputs, traces, 0)
    return torch.matmul(attention_weights(query, inputs.keys, snet.net.spec.hopfield_gamma, inputs.key_mask),
                        inputs.keys)


@torch.no_grad()
@pytest.mark.parametrize("pooled", [False, True])
def test_every_step_an_event_gives_the_exact_retrieval(pooled):
    net = small_net(**({"pool_queries": 2, "mask_padding": True} if pooled else {}))
    snet, inputs = event_net(net, 0.0), inputs_of(net)
    state = init_state(snet, inputs)
    for _ in range(12):
        expected = exact_retrieval(snet, inputs, state.traces)  # layer 0 reads the previous step's traces
        state, _, counts = spiking_step(snet, inputs, state)
        assert torch.allclose(state.traces[0], expected, atol=1e-12)
        assert counts[0] == inputs.batch_size


@torch.no_grad()
def test_rows_are_held_until_the_fc1_trace_drifts():
    net = small_net()
    snet, inputs = event_net(net, 1.5), inputs_of(net)
    state = init_state(snet, inputs)
    events = 0.0
    for t in range(20):
        old = state
        state, _, counts = spiking_step(snet, inputs, old)
        events += counts[0]
        if t == 0:
            assert counts[0] == inputs.batch_size  # the first step computes every sample's rows
            continue
        drift = (old.traces[1] - old.units[0].source).abs().sum(-1)
        fired = drift >= 1.5
        assert counts[0] == int(fired.sum())
        expected = exact_retrieval(snet, inputs, old.traces)
        assert torch.allclose(state.traces[0][fired], expected[fired], atol=1e-12)
        assert torch.equal(state.traces[0][~fired], old.traces[0][~fired])  # a settled row sends nothing
    assert inputs.batch_size < events < 20 * inputs.batch_size  # some events after the first, not every step


@torch.no_grad()
def test_events_are_decided_per_sample():
    net = small_net()
    snet, inputs = event_net(net, 0.5), inputs_of(net, batch=4)
    state = init_state(snet, inputs)
    for _ in range(10):
        state, _, _ = spiking_step(snet, inputs, state)
    x = torch.randn(4, 1, 6, 4, generator=torch.Generator().manual_seed(1)).double()
    for i in range(4):
        alone_inputs = net.prepare(x[i:i + 1])
        alone = init_state(snet, alone_inputs)
        for _ in range(10):
            alone, _, _ = spiking_step(snet, alone_inputs, alone)
        for a, b in zip(alone.traces, state.traces):
            assert torch.allclose(a, b[i:i + 1], atol=1e-12)


def test_default_attention_is_unchanged_and_drift_is_checked():
    snet = to_spiking(small_net(), "sigma_delta")
    assert snet.attention.mode == "herd" and not snet.attention.holds_rows
    with pytest.raises(ValueError, match="drift must be ≥ 0"):
        SpikingAttention("event", drift=-1.0)


def test_event_counts_by_hand():
    """P = 1 projection over L = 3 tokens of d = 2, rows Lq = 3, one hidden layer of n₁ = 4, 2 classes."""
    net = EPNet(build_spec("imdb", seq_len=3, dim=2, hidden=(4,), bias_offset=1.0), seed=0).double()
    snet = to_spiking(net, "sigma_delta", attention="event")
    rec = new_record(snet, 0)
    assert rec.dense_macs_per_event == {"query": 4 * 3 * 2, "scores": 3 * 3 * 2, "retrieval": 3 * 3 * 2,
                                        "values": 3 * 2 * 4}
    assert rec.fan_out == [0, 2, 4]  # fc1's spikes no longer drive the query: only out
    c = spiking_counts(snet, {"free": (4, {"proj": 3.0, "fc1": 7.0, "out": 3.0})}, memory=True)
    assert c.ops["free"]["proj"]["dense_mac"] == 3 * (24 + 18 + 18) + 3 * 2 * 2  # + X W₀ᵀ once
    assert c.ops["free"]["fc1"]["dense_mac"] == 3 * 24
    assert c.total("exp") == 3 * 9
    assert c.total("sop") == 7 * 2 + 3 * 4 and "sop" not in c.ops["free"]["proj"]
    assert c.total("neuron_update") == 4 * (4 + 4 + 2)  # drift detector (n₁), fc1, out
    assert c.total("spike_generation") == 7 + 3  # events are dense work, not spikes
    assert c.total("weight_read") == c.total("sop") + 3 * (24 + 24) + 12
    assert c.synapses() == 4 * 2 + 2 * 4


def test_cli_attention_drift_needs_event_mode(tmp_path, capsys):
    from analog_ep.cli import main
    from analog_ep.train.checkpoint import save_model

    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", small_net().float())
    assert main(["compare", str(run), "--synthetic", "8", "--timesteps", "4", "--attention-drift", "1",
                 "--no-plots", "--no-progress"]) == 2
    assert "--attention event" in capsys.readouterr().err
    assert main(["compare", str(run), "--synthetic", "8", "--timesteps", "4", "--attention", "event",
                 "--attention-drift", "1", "--no-plots", "--no-progress", "--json"]) == 0
    md = (run / "compare" / "compare.md").read_text()
    assert "attention event (recompute at an L1 drift of fc1's trace ≥ 1)" in md
    assert "Attention events per inference (recomputes of the rows, each priced as dense work): T = 4: " in md
