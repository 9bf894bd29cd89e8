"""`seqep compare` on a graph with several projections (SNLI: four projections share the one "proj" layer)."""

from __future__ import annotations

import json

import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import save_model
from spiking_ep.convert import to_spiking
from spiking_ep.energy.counting import analog_counts, layer_parameters, state_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_snli() -> EPNet:
    return EPNet(build_spec("snli", tiny=True), seed=0)


def test_layer_parameters_of_four_projections_cover_every_parameter():
    net = tiny_snli()
    spec = net.spec
    assert spec.num_projections == 4 and spec.layer_names == ["proj", "fc1", "out"]
    params = layer_parameters(spec)
    assert list(params) == spec.layer_names
    assert sum(params.values()) == sum(p.numel() for p in net.parameters())
    by_layer: dict[str, int] = {}
    for name, p in net.named_param_dict().items():
        layer = net.param_layer[name]
        by_layer[layer] = by_layer.get(layer, 0) + p.numel()
    assert params == by_layer  # each parameter counted at the layer it feeds


def test_analog_counts_of_four_projections_by_hand():
    spec = tiny_snli().spec  # P = 4 projections of L = 6 tokens, d = 8; FC 192 → 24 → 3
    assert state_sizes(spec) == [4 * 6 * 8, 24, 3]
    c = analog_counts(spec, {"free": 1})
    assert c.ops["free"]["fc1"]["mac"] == 192 * 24 + 3 * 24  # bottom-up from the projections, top-down from out
    assert c.ops["free"]["out"]["mac"] == 24 * 3
    # proj: W₁ᵀh¹ 24·192, scores + retrieval 2·(4·6)·6·8, and X W₀ᵀ once: 4·6·8·8
    assert c.ops["free"]["proj"]["mac"] == 24 * 192 + 2 * 24 * 6 * 8 + 4 * 6 * 8 * 8


def test_cli_compare_on_an_snli_run(tmp_path, capsys):
    from analog_ep.cli import main

    net = tiny_snli()
    run = tmp_path / "snli"
    save_model(run / "checkpoints" / "best.pt", net)
    assert main(["compare", str(run), "--synthetic", "8", "--timesteps", "4,8", "--probe-samples", "4",
                 "--no-plots", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 8 and report["network"]["layers"] == ["proj", "fc1", "out"]
    params = sum(p.numel() for p in net.parameters())
    for estimator, counts in report["counts"]["analog_training"].items():
        updates = counts["ops"]["update"]
        per_sample = {"ep_symmetric": 2, "cep": report["analog"]["training_steps"]["nudge"]}[estimator]
        assert sum(u["synaptic_update"] for u in updates.values()) == per_sample * params
    for profile in ("cmos45nm", "loihi"):
        inference = report["profiles"][profile]["inference"]["8"]
        assert inference["analog_pj"] > 0 and inference["spiking_pj"] > 0
        assert sum(inference["spiking_by_layer_pj"].values()) == pytest.approx(inference["spiking_pj"])
    assert (run / "compare" / "compare.md").is_file()


def test_spiking_training_counts_of_four_projections():
    from spiking_ep.energy.counting import spiking_training_counts
    from spiking_ep.learning import SpikingEPConfig

    net = tiny_snli()
    x = torch.randn(2, 2, 6, 8, generator=torch.Generator().manual_seed(0))
    counts = spiking_training_counts(to_spiking(net, "if"), x, torch.tensor([0, 2]),
                                     SpikingEPConfig(free_steps=4, nudge_steps=2))
    params = sum(p.numel() for p in net.parameters())
    assert counts["cep"].total("synaptic_update", phase="update") == 2 * params  # one per parameter and nudged step
