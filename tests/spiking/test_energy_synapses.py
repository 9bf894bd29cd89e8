"""Spikes per synapse per inference and the verdict against the published break-even points."""

from __future__ import annotations

import pytest

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.convert import to_spiking
from spiking_ep.energy.counting import spiking_counts
from spiking_ep.energy.literature import spike_rate_verdict, spikes_per_synapse_verdict, verdict_text

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spikes_per_synapse_by_hand():
    """P = 1 projection of L = 3 tokens, d = 2; FC 6 → 4 → 2. fc1's spikes reach the query (6 values) and
    out (2): 4 units × 8 synapses; out's reach fc1 (4): 2 units × 4 synapses; the attention rows none."""
    net = EPNet(build_spec("imdb", seq_len=3, dim=2, hidden=(4,), bias_offset=1.0), seed=0).double()
    counts = spiking_counts(to_spiking(net, "if"), {"free": (4, {"proj": 12.0, "fc1": 7.0, "out": 3.0})})
    assert counts.synapses() == 4 * 8 + 2 * 4
    assert counts.spikes_per_synapse() == pytest.approx((7 * 8 + 3 * 4) / 40)
    assert counts.spikes_per_synapse() == pytest.approx(counts.total("sop") / counts.synapses())
    assert counts.to_dict()["spikes_per_synapse"] == counts.spikes_per_synapse()
    silent = spiking_counts(to_spiking(net, "if"), {"free": (4, {"proj": 12.0, "fc1": 0.0, "out": 0.0})})
    assert silent.spikes_per_synapse() == 0.0


@pytest.mark.parametrize(("value", "verdict"), [(0.149, "below"), (0.15, "within"), (1.38, "within"),
                                                (1.381, "above")])
def test_spikes_per_synapse_verdict_edges(value, verdict):
    entry = spikes_per_synapse_verdict(value)
    assert entry["verdict"] == verdict and entry["threshold"] == [0.15, 1.38] and "TETCI" in entry["source"]
    assert verdict_text(entry).startswith(verdict)


def test_spike_rate_verdict_edges():
    assert spike_rate_verdict(0.0569)["verdict"] == "below" and spike_rate_verdict(0.057)["verdict"] == "above"
    assert verdict_text(spike_rate_verdict(0.3)) == "above (≥ 5.7 %)"
    assert verdict_text(spikes_per_synapse_verdict(0.1)) == "below (< 0.15)"
