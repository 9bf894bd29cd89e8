"""NIR export of the spiking network and its round trip: nir.write → nir.read → norse from_nir → run.

Tolerance of the round trip (docs/spiking.md, "NIR export"): norse must reproduce our reference's output spike
trains; float32 sums taken in another order could flip a spike at an exact threshold tie, so we allow
≥ 99 % identical trains and a count difference ≤ 1 per unit. Measured: identical (0 differences).
The second consumer (snntorch) and the attention's query ports: test_nir_consumers.py.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import save_model
from spiking_ep.nir_consumers import round_trip, run_norse
from spiking_ep.nir_export import (
    ATTENTION_NOT_EXPRESSIBLE,
    NOT_EXPRESSIBLE,
    export_nir,
    graph_input,
    readout,
    simulate_exported,
    subgraph,
)
from tests.helpers import trained_tiny_imdb

nir = pytest.importorskip("nir")  # every test here writes a NIR graph; only the round trips also need norse
needs_norse = pytest.mark.skipif(importlib.util.find_spec("norse") is None, reason="norse is not installed")


def tiny(model: str, **options) -> EPNet:
    return EPNet(build_spec(model, tiny=True, bias_offset=1.0, **options), seed=0)


def test_graph_has_if_units_and_w_and_wT_edges(tmp_path):
    net = tiny("imdb")
    export = export_nir(net, tmp_path / "net.nir")
    graph = nir.read(export.path)
    names = net.spec.layer_names[1:]  # fc1, fc2, out: the projection layer is not exported
    assert all(isinstance(graph.nodes[n], nir.IF) for n in names)
    assert all(np.all(graph.nodes[n].v_reset == 0) and np.all(graph.nodes[n].v_threshold == 1) for n in names)
    w2 = net.weights[1].detach().numpy()
    np.testing.assert_allclose(graph.nodes["w_fc2"].weight, w2 / 2)
    np.testing.assert_allclose(graph.nodes["wT_fc2"].weight, w2.T / 2)
    np.testing.assert_allclose(graph.nodes["w_fc2"].bias, net.biases[1].detach().numpy() / 2)
    edges = set(graph.edges)
    assert {("fc1", "w_fc2"), ("w_fc2", "fc2"), ("fc2", "wT_fc2"), ("wT_fc2", "fc1"), ("input", "w_fc1")} <= edges
    assert graph.nodes["input"].input_type["input"].tolist() == [net.spec.fc_input_size]
    meta = graph.metadata
    assert all(f"not_expressible.{k}" in meta for k in {**NOT_EXPRESSIBLE, **ATTENTION_NOT_EXPRESSIBLE})
    assert "reset to 0" in meta["semantics"] and "precomputed" in meta["input"]
    assert json.loads(meta["layers"]) == names


@needs_norse
@pytest.mark.parametrize("model", ["imdb", "snli", "mlp"])
def test_round_trip_through_norse_reproduces_our_spikes(model, tmp_path):
    net = tiny(model)
    path = export_nir(net, tmp_path / f"{model}.nir").path
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, net.spec.num_streams, net.spec.seq_len, net.spec.dim, generator=g)
    result = round_trip(path, net, x, steps=64, consumers=["norse"])
    assert result["output_spikes_per_sample"]["ours"] > 0  # the check is not vacuous
    assert result["identical_output_trains"] >= 0.99 and result["max_count_difference"] <= 1
    assert result["prediction_match_norse"] >= 0.99


@needs_norse
def test_dt_does_not_change_the_imported_network(tmp_path):
    """No time constants in the graph: norse's dt (1 ms default) must not matter."""
    from norse.torch import from_nir

    net = tiny("imdb")
    path = export_nir(net, tmp_path / "net.nir").path
    fc_input, _ = graph_input(net, torch.randn(4, 1, net.spec.seq_len, net.spec.dim))
    spiking = subgraph(nir.read(path), "input", "output")  # nirtorch runs one input and one output
    module = {dt: from_nir(spiking, dt=dt) for dt in (1e-3, 1e-4)}
    runs = {}
    for dt, m in module.items():
        state, out = None, []
        for _ in range(40):
            z, state = m(fc_input, state)
            out.append(z)
        runs[dt] = torch.stack(out)
    assert torch.equal(runs[1e-3], runs[1e-4]) and runs[1e-3].sum() > 0


@needs_norse
def test_reset_semantics_are_reset_to_zero_on_both_sides(tmp_path):
    """One IF unit with a constant current 0.4 per step: reset to zero fires every 3rd step (rate 1/3, not 0.4)."""
    net = EPNet(build_spec("mlp", input_size=1, hidden=(), num_classes=1), seed=0)
    with torch.no_grad():
        net.weights[0].fill_(0.8)  # I = u/2 = 0.8·x/2 = 0.4 for x = 1
        net.biases[0].zero_()
    path = export_nir(net, tmp_path / "one.nir").path
    x = torch.ones(1, 1)
    ours = simulate_exported(net, x, 30)[-1]
    theirs = run_norse(path, x, 30)
    assert torch.equal(ours, theirs) and ours.sum() == 10
    assert ours[:, 0, 0].nonzero().flatten().tolist()[:3] == [2, 5, 8]


@needs_norse
def test_exported_trained_network_agrees_with_analog(tmp_path):
    """The semantic gap (clamp, reset to zero, no traces, no attention feedback) is small on a trained model."""
    net, (x, y) = trained_tiny_imdb()
    path = export_nir(net, tmp_path / "trained.nir").path
    result = round_trip(path, net, x[:100], steps=256, y=y[:100], consumers=["norse"])
    assert result["identical_output_trains"] >= 0.99
    assert result["agreement_with_analog"] >= 0.9 and result["accuracy"] >= result["analog_accuracy"] - 0.1
    fc_input, analog_pred = graph_input(net, x[:8])
    assert readout(simulate_exported(net, fc_input, 256)[-1]).shape == analog_pred.shape


@pytest.fixture
def saved_run(tmp_path):
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", tiny("imdb"))
    return run


def test_cli_export_nir_states_what_is_left_out(saved_run, tmp_path, capsys):
    from analog_ep.cli import main

    assert main(["export-nir", str(saved_run), str(tmp_path / "out.nir")]) == 0
    out = capsys.readouterr().out
    assert "proj.scores" in out and "proj.softmax" in out and "plasticity" in out and "check it: seqep" in out
    assert nir.read(tmp_path / "out.nir").metadata["source_run"] == str(saved_run)
    assert main(["export-nir", str(saved_run), str(tmp_path / "b.nir"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["nodes"] == 15 and "no exponential" in result["not_expressible"]["proj.softmax"]


@needs_norse
def test_cli_export_nir_check_runs_the_file_through_norse(saved_run, tmp_path, capsys):
    from analog_ep.cli import main

    assert main(["export-nir", str(saved_run), str(tmp_path / "out.nir"), "--check", "8", "--steps", "32"]) == 0
    out = capsys.readouterr().out
    assert "norse round trip (8 samples × 32 steps): identical spike trains fc1 100.0 %" in out
    assert "query ports within" in out
    assert ("snntorch round trip" in out) == (importlib.util.find_spec("snntorch") is not None)
