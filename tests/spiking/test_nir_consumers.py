"""The exported graph in a second consumer (snntorch), its no-leak LIF form, and the attention's query ports.

Tolerance as in test_nir.py: ≥ 99 % identical output spike trains, count difference ≤ 1 per unit (a float32
sum taken in another order could flip a spike at an exact threshold tie). Measured: identical everywhere.
The query ports are linear: they must match Φ's query current ∂Φ/∂s¹ to float32 rounding (1e-5).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io

import numpy as np
import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from spiking_ep.nir_consumers import round_trip, run_consumer, tapped
from spiking_ep.nir_export import (
    ATTENTION_NOT_EXPRESSIBLE,
    LIF_DT,
    LIF_GAIN,
    export_nir,
    graph_input,
    nir_graph,
    not_expressible,
    simulate_exported,
    subgraph,
)
from tests.helpers import trained_tiny_imdb

nir = pytest.importorskip("nir")
both = pytest.mark.skipif(any(importlib.util.find_spec(c) is None for c in ("norse", "snntorch")),
                          reason="needs norse and snntorch")
MODELS = [("imdb", {}), ("imdb", {"pool_queries": 3}), ("snli", {}), ("mlp", {})]


def tiny(model: str, **options) -> EPNet:
    return EPNet(build_spec(model, tiny=True, bias_offset=1.0, **options), seed=0)


def tokens(net: EPNet, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, net.spec.num_streams, net.spec.seq_len, net.spec.dim, generator=g)


def assert_reproduced(result: dict, consumers: tuple[str, ...] = ("norse", "snntorch")) -> None:
    assert set(result["consumers"]) == set(consumers)
    assert result["output_spikes_per_sample"]["ours"] > 0  # the check is not vacuous
    assert all(count > 0 for count in result["spikes_per_sample"].values())  # every layer spikes
    for name in consumers:
        c = result["consumers"][name]
        assert c["identical_output_trains"] >= 0.99 and c["max_count_difference"] <= 1, name
        assert list(c["layers"]) == list(result["spikes_per_sample"])  # every FC layer compared
        for layer, r in c["layers"].items():
            assert r["identical_trains"] >= 0.99 and r["max_count_difference"] <= 1, (name, layer)
        assert c["prediction_match"] >= 0.99, name
        assert c.get("query_port_max_error", 0.0) < 1e-5, name


@both
@pytest.mark.parametrize("model,options", MODELS, ids=[f"{m}{'-pooled' if o else ''}" for m, o in MODELS])
def test_norse_and_snntorch_reproduce_our_spikes_and_query(model, options, tmp_path):
    net = tiny(model, **options)
    path = export_nir(net, tmp_path / "net.nir").path
    result = round_trip(path, net, tokens(net), steps=64, consumers=["norse", "snntorch"])
    assert_reproduced(result)
    assert ("query_port_max_error" in result["consumers"]["snntorch"]) == bool(net.spec.num_projections)


@both
def test_trained_network_matches_in_both_consumers(tmp_path):
    net, (x, _) = trained_tiny_imdb()
    path = export_nir(net, tmp_path / "trained.nir").path
    result = round_trip(path, net, x[:64], steps=128, consumers=["norse", "snntorch"])
    assert_reproduced(result)
    counts = result["output_spikes_per_sample"]
    assert counts["norse"] == counts["snntorch"] == counts["ours"]
    for layer, ours in result["spikes_per_sample"].items():
        assert all(result["consumers"][c]["layers"][layer]["spikes_per_sample"] == ours for c in ("norse", "snntorch"))


@both
def test_lif_form_runs_as_the_if_network_in_both_consumers(tmp_path):
    """--neuron lif: τ = 2³⁰·dt and inputs × 2³⁰ (exact in float): the same spikes as the IF form."""
    net = tiny("imdb")
    if_graph = nir_graph(net)
    path = export_nir(net, tmp_path / "lif.nir", neuron="lif").path
    graph = nir.read(path)
    assert isinstance(graph.nodes["fc1"], nir.LIF) and np.allclose(graph.nodes["fc1"].tau, LIF_GAIN * LIF_DT)
    np.testing.assert_array_equal(graph.nodes["w_fc2"].weight, if_graph.nodes["w_fc2"].weight * np.float32(LIF_GAIN))
    np.testing.assert_array_equal(graph.nodes["wT_fc1"].weight, if_graph.nodes["wT_fc1"].weight)  # not into a unit
    fc_input, _ = graph_input(net, tokens(net))
    hidden = simulate_exported(net, fc_input, 64)
    ours = hidden[-1]
    spiking = subgraph(graph, "input", "output")
    for consumer in ("norse", "snntorch"):
        assert torch.equal(run_consumer(consumer, spiking, fc_input, 64), ours), consumer
        assert torch.equal(run_consumer(consumer, tapped(spiking, "fc1"), fc_input, 64), hidden[0]), consumer


@both
def test_snntorch_reads_nir_if_as_a_leaky_neuron():
    """Why snntorch gets the LIF form: its import maps nir.IF to Leaky(β = 0.9), reset by subtraction."""
    from snntorch.import_nir import import_from_nir

    spiking = subgraph(nir_graph(tiny("mlp")), "input", "output")
    with contextlib.redirect_stdout(io.StringIO()):
        module = import_from_nir(spiking)
    assert float(module.out.beta) == pytest.approx(0.9) and module.out.reset_mechanism == "subtract"
    assert not module.out.init_hidden  # so it returns (spikes, membrane) where the next edge expects spikes


def test_query_ports_and_the_named_attention_nodes():
    pooled, plain, mlp = tiny("imdb", pool_queries=3), tiny("snli"), tiny("mlp")
    graph = nir_graph(pooled)  # the learned queries are the bias of the top-down query edge
    np.testing.assert_allclose(graph.nodes["wT_fc1"].bias, pooled.proj_query.detach().numpy().reshape(-1))
    np.testing.assert_allclose(graph.nodes["wT_fc1"].weight, pooled.weights[0].detach().numpy().T)
    assert "tokens" not in graph.nodes and ("fc1", "wT_fc1") in graph.edges
    graph = nir_graph(plain)  # 4 projections: W₀ᵖ on the diagonal of a 1×1 convolution over the tokens
    P, d = plain.spec.num_projections, plain.spec.dim
    conv = graph.nodes["w0"].weight[..., 0, 0]
    np.testing.assert_allclose(conv[d:2 * d, d:2 * d], plain.proj_weight[1].detach().numpy())
    assert conv.shape == (P * d, P * d) and not conv[:d, d:].any()
    assert set(ATTENTION_NOT_EXPRESSIBLE) <= set(not_expressible(graph))
    assert not any(k.startswith("proj.") for k in not_expressible(nir_graph(mlp)))
    assert "query" not in nir_graph(mlp).nodes


def test_subgraph_cuts_the_spiking_part_and_the_ports():
    graph = nir_graph(tiny("imdb"))
    spiking = subgraph(graph, "input", "output")
    assert not {"query", "wT_fc1", "tokens", "w0", "token_query"} & set(spiking.nodes)
    assert ("wT_fc2", "fc1") in spiking.edges  # the feedback loops stay
    port = subgraph(graph, "fc1", "query")
    assert set(port.nodes) == {"fc1", "wT_fc1", "query"} and isinstance(port.nodes["fc1"], nir.Input)
    with pytest.raises(ValueError, match="no path"):
        subgraph(graph, "query", "input")
