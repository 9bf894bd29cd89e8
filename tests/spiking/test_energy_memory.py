"""Memory traffic (weight reads) as an optional priced kind: off by default, counted by hand, priced only
by a profile that cites a source for it."""

from __future__ import annotations

import json

import pytest

from analog_ep.errors import ConfigError
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import save_model
from spiking_ep.convert import to_spiking
from spiking_ep.energy.counting import analog_counts, spiking_counts
from spiking_ep.energy.pricing import compare, load_profile, spiking_energy_at_rate
from tests.helpers import trained_tiny_imdb

pytestmark = pytest.mark.usefixtures("one_thread")

SPIKES = {"proj": 12.0, "fc1": 7.0, "out": 3.0}


def small_imdb() -> EPNet:
    """P = 1 projection over L = 3 tokens of d = 2, one hidden layer of 4, 2 classes."""
    return EPNet(build_spec("imdb", seq_len=3, dim=2, hidden=(4,), bias_offset=1.0), seed=0).double()


def test_weight_reads_are_off_by_default_and_counted_by_hand():
    net = small_imdb()
    snet = to_spiking(net, "if")
    assert analog_counts(net.spec, {"free": 5}).total("weight_read") == 0
    assert spiking_counts(snet, {"free": (4, SPIKES)}).total("weight_read") == 0
    analog = analog_counts(net.spec, {"free": 5}, memory=True)
    # every MAC reads a weight but the scores and retrieval (2·3·3·2 = 36 per step: they read keys)
    assert analog.total("weight_read") == analog.total("mac") - 5 * 36 == 5 * 64 + 12
    spiking = spiking_counts(snet, {"free": (4, SPIKES)}, memory=True)
    # one read per sop, per value-path MAC (3·2·4 per step) and per input-current MAC (L·d·d once)
    assert spiking.total("weight_read") == spiking.total("sop") + 4 * 24 + 12
    assert spiking.total("weight_read", layer="fc1") == 3 * 4 + 4 * 24


def test_shipped_profiles_leave_weight_reads_unpriced_and_say_so():
    net = small_imdb()
    snet = to_spiking(net, "if")
    for name in ("cmos45nm", "loihi"):
        profile = load_profile(name)
        assert "weight_read" not in profile.analog and "weight_read" not in profile.spiking
        plain = compare(analog_counts(net.spec, {"free": 5}), spiking_counts(snet, {"free": (4, SPIKES)}), profile)
        counted = compare(analog_counts(net.spec, {"free": 5}, memory=True),
                          spiking_counts(snet, {"free": (4, SPIKES)}, memory=True), profile)
        assert counted.analog_pj == plain.analog_pj and counted.spiking_pj == plain.spiking_pj
        assert plain.unpriced == () and counted.unpriced == ("analog.weight_read", "spiking.weight_read")


def test_a_profile_prices_weight_reads_only_with_a_source(tmp_path):
    path = tmp_path / "sram.toml"
    path.write_text('name = "sram"\nbase = "cmos45nm"\n[analog]\nweight_read = 5.0\n')
    with pytest.raises(ConfigError, match="needs its source"):
        load_profile(path)
    path.write_text('name = "sram"\nbase = "cmos45nm"\n[analog]\nweight_read = 5.0\n[spiking]\nweight_read = 5.0\n'
                    '[sources]\n"analog.weight_read" = "our SRAM macro"\n"spiking.weight_read" = "our SRAM macro"\n')
    sram = load_profile(path)
    assert ("analog.weight_read", 5.0, "our SRAM macro") in sram.rows()
    net = small_imdb()
    snet = to_spiking(net, "if")
    analog = analog_counts(net.spec, {"free": 5}, memory=True)
    spiking = spiking_counts(snet, {"free": (4, SPIKES)}, memory=True)
    base = load_profile("cmos45nm")
    assert analog.energy_pj(sram) == pytest.approx(analog.energy_pj(base) + 5.0 * analog.total("weight_read"))
    assert spiking.energy_pj(sram) == pytest.approx(spiking.energy_pj(base) + 5.0 * spiking.total("weight_read"))
    comp = compare(analog, spiking, sram)
    assert comp.unpriced == ()
    # the break-even line still meets the analog energy at ρ*: a spike's reads scale with the spikes
    assert spiking_energy_at_rate(comp, comp.mean_rate) == pytest.approx(comp.spiking_pj)
    assert spiking_energy_at_rate(comp, comp.break_even_rate) == pytest.approx(comp.analog_pj)


def test_cli_compare_memory_reports_unpriced_and_priced_reads(tmp_path, capsys):
    from analog_ep.cli import main

    net, _ = trained_tiny_imdb()
    run = tmp_path / "tiny"
    save_model(run / "checkpoints" / "best.pt", net)
    sram = tmp_path / "sram.toml"
    sram.write_text('name = "sram"\nbase = "cmos45nm"\n[analog]\nweight_read = 5.0\n[spiking]\nweight_read = 5.0\n'
                    '[sources]\n"analog.weight_read" = "ours"\n"spiking.weight_read" = "ours"\n')
    assert main(["compare", str(run), "--synthetic", "16", "--timesteps", "8", "--profile", f"cmos45nm,{sram}",
                 "--memory", "--no-plots", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["memory"] is True and report["counts"]["analog_inference"]["totals"]["weight_read"] > 0
    assert report["profiles"]["cmos45nm"]["inference"]["8"]["unpriced"] == ["analog.weight_read",
                                                                            "spiking.weight_read"]
    assert report["profiles"]["sram"]["inference"]["8"]["unpriced"] == []
    md = (run / "compare" / "compare.md").read_text()
    assert "not priced** by `cmos45nm`" in md and "Weight reads priced: analog.weight_read 5 pJ" in md
