"""Energy accounting (spiking_ep.energy.counting, .pricing) and the analog-vs-spiking report: counts by hand."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import save_model
from spiking_ep.convert import to_spiking
from spiking_ep.dynamics import new_record, spiking_free_phase
from spiking_ep.energy.counting import (
    PRICES,
    Counts,
    analog_counts,
    analog_training_counts,
    layer_parameters,
    record_phases,
    spiking_counts,
    spiking_training_counts,
)
from spiking_ep.energy.pricing import available_profiles, compare, load_profile, spiking_energy_at_rate
from spiking_ep.learning import SpikingEPConfig, spiking_ep_symmetric
from tests.helpers import trained_tiny_imdb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def small_imdb(**options) -> EPNet:
    """P = 1 projection over L = 3 tokens of d = 2, one hidden layer of 4, 2 classes."""
    spec = build_spec("imdb", seq_len=3, dim=2, hidden=(4,), bias_offset=1.0, **options)
    return EPNet(spec, seed=0).double()


# ---------------------------------------------------------------- analog counts, by hand
def test_analog_counts_by_hand():
    spec = small_imdb().spec
    c = analog_counts(spec, {"free": 5})
    # per step: proj 4·6 (W₁ᵀh¹) + 2·3·3·2 (scores, retrieval); fc1 6·4 + 2·4; out 4·2  → 100 MACs
    assert c.ops["free"]["proj"]["mac"] == 5 * (24 + 36) + 1 * 3 * 2 * 2  # + X W₀ᵀ once: L·d·d
    assert c.ops["free"]["fc1"]["mac"] == 5 * (24 + 8)
    assert c.ops["free"]["out"]["mac"] == 5 * 8
    assert c.total("mac") == 5 * 100 + 12
    assert c.total("exp") == 5 * 9  # L·L softmax entries per step
    assert c.total("neuron_update") == 5 * (4 + 2)


def test_analog_counts_pooled_and_mlp_by_hand():
    pooled = analog_counts(small_imdb(pool_queries=2, mask_padding=True).spec, {"free": 1})
    # rows = m = 2: W₁ᵀh¹ 4·(2·2), scores + retrieval 2·2·3·2, fc1 4·4 + 2·4, out 4·2; no input current
    assert pooled.total("mac") == 16 + 24 + 16 + 8 + 8 and pooled.total("exp") == 6
    mlp = build_spec("mlp", input_size=5, hidden=(4,), num_classes=2)
    c = analog_counts(mlp, {"free": 3})
    assert c.ops["free"]["fc1"]["mac"] == 5 * 4 + 3 * (2 * 4)  # W₀x once, top-down every step
    assert c.ops["free"]["out"]["mac"] == 3 * 4 * 2
    assert c.total("exp") == 0


def test_analog_training_counts_by_hand():
    spec = small_imdb().spec
    assert layer_parameters(spec) == {"proj": 4, "fc1": 6 * 4 + 4, "out": 4 * 2 + 2}
    train = analog_training_counts(spec, free_steps=5, nudge_steps=2)
    sym, cep = train["ep_symmetric"], train["cep"]
    assert sym.steps == {"free": 5, "nudge+": 2, "nudge-": 2} and cep.steps == {"free": 5, "cep": 2}
    assert sym.total("mac") == (5 + 2 + 2) * 100 + 12  # the input current is computed once per sample
    assert sym.total("synaptic_update") == 2 * 42 and cep.total("synaptic_update") == 2 * 42
    assert sym.total("mac", phase="nudge+") == sym.total("mac", phase="nudge-") == 200


# ---------------------------------------------------------------- spiking counts, by hand
def test_spiking_counts_from_given_spikes_by_hand():
    snet = to_spiking(small_imdb(), "if")
    spikes = {"proj": 12.0, "fc1": 7.0, "out": 3.0}  # proj: 3 rows × 4 steps of winner events
    c = spiking_counts(snet, {"free": (4, spikes)})
    # SOPs to the receivers: fc1's spikes reach proj's query (6 values) and out (2); out's reach fc1 (4)
    assert c.ops["free"]["proj"]["sop"] == 7 * 6
    assert c.ops["free"]["out"]["sop"] == 7 * 2
    assert c.ops["free"]["fc1"]["sop"] == 3 * 4
    # dense: scores 3·3·2 per step (proj), value path 3·2·4 per step (fc1), X W₀ᵀ once (proj)
    assert c.ops["free"]["proj"]["dense_mac"] == 4 * 18 + 12
    assert c.ops["free"]["fc1"]["dense_mac"] == 4 * 24
    assert c.total("exp") == 4 * 9
    assert c.total("neuron_update") == 4 * (9 + 4 + 2)  # pointer units 3×3, fc1, out
    assert c.total("spike_generation") == 12 + 7 + 3
    assert c.rate_model["fc1"] == {"spikes": 7.0, "fan_out": 8, "units": 4, "unit_steps": 16}
    assert c.mean_rate() == pytest.approx(10 / (4 * 4 + 4 * 2))


@dataclass(frozen=True)
class ClockCoding:
    """A known spike train: every unit fires at every odd step (t = 1, 3, …), whatever its input."""

    name: str = "clock"
    signed: bool = False

    def init(self, like):
        return torch.zeros((), dtype=torch.int64)

    def encode(self, rate, t):
        return torch.full_like(rate, float(t % 2 == 1)), t + 1

    def decode(self, trace, spikes, alpha):
        return trace + alpha * (spikes - trace)


def test_counters_on_known_spike_trains_equal_hand_counts():
    net = EPNet(build_spec("mlp", input_size=5, hidden=(4, 3), num_classes=2), seed=0).double()
    snet = to_spiking(net, "if")
    snet.coding = ClockCoding()
    record = new_record(snet, samples=2)
    spiking_free_phase(snet, net.prepare(torch.randn(2, 1, 1, 5, dtype=torch.float64)), 6, record=record)
    assert record.spikes_per_sample("free") == {"fc1": 4 * 3, "fc2": 3 * 3, "out": 2 * 3}  # 3 odd steps of 6
    c = spiking_counts(snet, record_phases(record))
    # fc1 → fc2 (3 each), fc2 → fc1 (4) and out (2), out → fc2 (3)
    assert c.total("sop") == 12 * 3 + 9 * (4 + 2) + 6 * 3 == record.synaptic_ops_per_sample("free")
    assert c.total("dense_mac") == 5 * 4  # the constant input current W₀x, once
    assert c.total("neuron_update") == 6 * (4 + 3 + 2)
    assert c.mean_rate() == pytest.approx(0.5)


def test_spiking_counts_agree_with_the_spike_record_on_a_real_run():
    net = small_imdb()
    snet = to_spiking(net, "sigma_delta")
    record = new_record(snet, samples=3)
    spiking_free_phase(snet, net.prepare(torch.randn(3, 1, 3, 2, dtype=torch.float64)), 10, record=record)
    c = spiking_counts(snet, record_phases(record))
    assert c.total("sop") == pytest.approx(record.synaptic_ops_per_sample("free"))
    assert c.total("dense_mac") == pytest.approx(record.dense_macs("free"))


def test_training_counts_match_spiking_ep_symmetric():
    net = small_imdb()
    snet = to_spiking(net, "if", tau=4)
    x, y = torch.randn(4, 1, 3, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    cfg = SpikingEPConfig(beta=0.2, free_steps=12, nudge_steps=6)
    counts = spiking_training_counts(snet, x, y, cfg)
    est = spiking_ep_symmetric(snet, x, y, cfg, set_grad=False)
    sym = counts["ep_symmetric"]
    nudge = est.record.spikes_per_sample("nudge")  # the stacked ±β batch, per sample
    for layer in net.spec.layer_names:
        ours = sym.ops["nudge+"][layer]["spike_generation"] + sym.ops["nudge-"][layer]["spike_generation"]
        assert ours == pytest.approx(nudge[layer])
    assert sym.total("synaptic_update") == est.synapse_updates["nudge"]
    assert counts["cep"].total("synaptic_update") == cfg.nudge_steps * sum(p.numel() for p in net.parameters())


# ---------------------------------------------------------------- profiles and linearity
def test_shipped_profiles_state_every_constant_and_its_source():
    assert {"cmos45nm", "loihi"} <= set(available_profiles())
    cmos, loihi = load_profile("cmos45nm"), load_profile("loihi")
    assert cmos.analog["mac"] == 4.6 and cmos.spiking["sop"] == 0.9
    assert loihi.spiking["sop"] == 23.6 and loihi.spiking["synaptic_update"] == 120
    assert loihi.spiking["neuron_update"] + loihi.spiking["spike_generation"] == 81  # active; idle 52
    for profile in (cmos, loihi):
        rows = profile.rows()
        assert len(rows) == sum(len(k) for k in PRICES.values())
        assert all(source and source != "not given" for *_, source in rows)


def test_user_profile_file(tmp_path):
    path = tmp_path / "chip.toml"
    path.write_text('name = "chip"\nbase = "loihi"\n[spiking]\nsop = 5.0\n[sources]\n"spiking.sop" = "datasheet"\n')
    chip = load_profile(path)
    assert chip.spiking["sop"] == 5.0 and chip.sources["spiking.sop"] == "datasheet"
    assert chip.spiking["neuron_update"] == 52.0 and chip.analog == load_profile("loihi").analog
    from analog_ep.errors import ConfigError

    for text, message in [('base = "cmos45nm"\n[spiking]\nsop = -1\n', "≥ 0"),
                          ('base = "cmos45nm"\n[spiking]\nfoo = 1\n', "unknown price"),
                          ("[analog]\nmac = 1\n", "lacks"), ("speed = 3\n", "unknown key")]:
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_profile(path)
    with pytest.raises(ConfigError, match="no energy profile"):
        load_profile("nowhere")


def test_registered_profiles_work_by_name_everywhere(tmp_path):
    from dataclasses import replace

    from analog_ep.errors import ConfigError
    from spiking_ep.energy.pricing import register_profile, unregister_profile

    mine = replace(load_profile("cmos45nm").with_prices(spiking__sop=0.25), name="mine")
    path = tmp_path / "chip.toml"
    path.write_text('name = "chip"\nbase = "mine"\n[analog]\nmac = 9.0\n')  # based on a registered name
    try:
        assert register_profile(mine) is mine and "mine" in available_profiles()
        with pytest.raises(ConfigError, match="already registered"):
            register_profile(mine)
        chip = register_profile(path)
        assert load_profile("chip") is chip and chip.analog["mac"] == 9.0 and chip.spiking["sop"] == 0.25
        register_profile(replace(mine, description="again"), replace=True)
        assert load_profile("mine").description == "again"
    finally:
        unregister_profile("mine")
        unregister_profile("chip")
    assert available_profiles() == ["cmos45nm", "loihi"]
    with pytest.raises(ConfigError, match="no energy profile 'mine'"):
        load_profile("mine")


def test_energy_is_linear_in_every_constant():
    spec = small_imdb().spec
    snet = to_spiking(small_imdb(), "if")
    spiking = spiking_counts(snet, {"free": (8, {"proj": 24.0, "fc1": 11.0, "out": 5.0})},
                             updates=layer_parameters(spec))
    analog = analog_counts(spec, {"free": 8}, updates=layer_parameters(spec))
    base = load_profile("loihi")
    for counts in (analog, spiking):
        e0 = counts.energy_pj(base)
        assert e0 == pytest.approx(sum(counts.total(k) * base.price(counts.backend, k) for k in PRICES[counts.backend]))
        for kind in PRICES[counts.backend]:
            bumped = base.with_prices(**{f"{counts.backend}__{kind}": base.price(counts.backend, kind) + 2.5})
            assert counts.energy_pj(bumped) == pytest.approx(e0 + 2.5 * counts.total(kind))
        scaled = base.with_prices(**{f"{counts.backend}__{k}": 3 * base.price(counts.backend, k)
                                     for k in PRICES[counts.backend]})
        assert counts.energy_pj(scaled) == pytest.approx(3 * e0)
        assert sum(counts.energy_by(base, "layer").values()) == pytest.approx(e0)
        assert sum(counts.energy_by(base, "phase").values()) == pytest.approx(e0)


# ---------------------------------------------------------------- break-even rate
def _scaled_spikes(spikes: dict[str, float], factor: float, attention: str = "proj") -> dict[str, float]:
    return {k: v if k == attention else v * factor for k, v in spikes.items()}


@pytest.mark.parametrize("profile", ["cmos45nm", "loihi"])
def test_break_even_rate_makes_the_energies_equal(profile):
    net = small_imdb()
    snet = to_spiking(net, "if")
    spikes = {"proj": 3.0 * 40, "fc1": 4 * 40 * 0.3, "out": 2 * 40 * 0.3}  # rate 0.3 over T = 40
    analog = analog_counts(net.spec, {"free": 30})
    prices = load_profile(profile)
    comp = compare(analog, spiking_counts(snet, {"free": (40, spikes)}), prices)
    assert comp.mean_rate == pytest.approx(0.3)
    for rate in (0.1, 0.3, 0.6):  # re-measured with every rate scaled: the energy lies on the line E(ρ)
        at = spiking_counts(snet, {"free": (40, _scaled_spikes(spikes, rate / 0.3))})
        assert at.energy_pj(prices) == pytest.approx(spiking_energy_at_rate(comp, rate))
    # ρ* is where that line meets the analog energy, also where ρ* ≤ 0 (the fixed part alone costs more)
    assert spiking_energy_at_rate(comp, comp.break_even_rate) == pytest.approx(comp.analog_pj)
    assert (comp.break_even_rate <= 0) == (comp.fixed_pj >= comp.analog_pj)
    assert comp.pays_off == (comp.mean_rate < comp.break_even_rate)


def test_break_even_closed_form_without_dense_parts():
    """A plain MLP priced by MACs and SOPs only: ρ* = T₁·2ab·e_mac / (T·(a·b + b·a)·e_sop) = T₁·e_mac / (T·e_sop)."""
    spec = build_spec("mlp", input_size=3, hidden=(6,), num_classes=4)
    snet = to_spiking(EPNet(spec, seed=0), "if")
    prices = {f"{b}__{k}": 0.0 for b, kinds in PRICES.items() for k in kinds}
    profile = load_profile("cmos45nm").with_prices(**{**prices, "analog__mac": 4.6, "spiking__dense_mac": 4.6,
                                                      "spiking__sop": 0.9})
    T1, T, rate = 20, 50, 0.2
    analog = analog_counts(spec, {"free": T1})
    comp = compare(analog, spiking_counts(snet, {"free": (T, {"fc1": 6 * T * rate, "out": 4 * T * rate})}), profile)
    assert comp.fixed_pj == pytest.approx(3 * 6 * 4.6)  # the constant input current W₀x, once, on both sides
    assert comp.mean_rate == pytest.approx(rate)
    assert comp.break_even_rate == pytest.approx(T1 * 4.6 / (T * 0.9))
    assert comp.ratio == pytest.approx((3 * 6 + T1 * 48) / (3 * 6 + rate * T * 48 * 0.9 / 4.6))


def test_never_pays_off_when_the_dense_parts_alone_cost_more():
    net = small_imdb()
    snet = to_spiking(net, "if")
    profile = load_profile("cmos45nm").with_prices(spiking__dense_mac=100.0)
    comp = compare(analog_counts(net.spec, {"free": 2}), spiking_counts(snet, {"free": (64, {
        "proj": 192.0, "fc1": 10.0, "out": 1.0})}), profile)
    assert comp.break_even_rate <= 0 and not comp.pays_off and comp.verdict().startswith("never")


def test_counts_reject_unknown_operations():
    with pytest.raises(ValueError, match="not a analog operation"):
        Counts("analog", ["fc1"]).add("free", "fc1", "sop", 1)


# ---------------------------------------------------------------- the comparison report
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    net, (x, y) = trained_tiny_imdb()
    run = tmp_path_factory.mktemp("runs") / "tiny"
    save_model(run / "checkpoints" / "best.pt", net)
    return run, net, x, y


def test_compare_writes_report_files_and_plots(trained_run):
    from spiking_ep.energy.compare import CompareOptions, compare_run
    from spiking_ep.energy.report import console_table
    from spiking_ep.evaluate import batches_from_tensors

    run, net, x, y = trained_run
    options = CompareOptions(timesteps=(8, 32), profiles=("cmos45nm", "loihi"), probe_samples=8, progress=False,
                             command="pytest")
    report = compare_run(run, to_spiking(net), batches=batches_from_tensors(x[:64], y[:64], 32), options=options)
    out = run / "compare"
    parsed = json.loads((out / "compare.json").read_text())
    assert parsed["samples"] == 64 and set(parsed["timesteps"]) == {"8", "32"}
    assert set(parsed["profiles"]) == {"cmos45nm", "loihi"}
    inf = parsed["profiles"]["loihi"]["inference"]["32"]
    assert inf["spiking_pj"] > 0 and inf["analog_pj"] > 0
    assert sum(inf["spiking_by_layer_pj"].values()) == pytest.approx(inf["spiking_pj"])
    assert set(parsed["profiles"]["cmos45nm"]["training"]["8"]) == {"ep_symmetric", "cep"}
    assert parsed["software"]["torch"] and parsed["command"] == "pytest" and parsed["analog"]["inference_steps"] == 50
    md = (out / "compare.md").read_text()
    for needle in ("## Accuracy and spikes", "Energy per inference, profile `loihi`", "Energy per training sample",
                   "Horowitz", "Davies", "break-even", "## Against published break-even points", "Dampfhoffer"):
        assert needle in md
    row = parsed["timesteps"]["32"]
    spikes = parsed["counts"]["spiking_inference"]["32"]
    assert row["spikes_per_synapse"] == pytest.approx(spikes["totals"]["sop"] / row["synapses"])
    assert row["literature"]["spike_rate"]["value"] == row["mean_rate"]
    assert f"| 32 | {row['spikes_per_synapse']:.3g} | {row['literature']['spikes_per_synapse']['verdict']} (" in md
    assert md.count("| spiking | 8 |") == 1 and md.count("| spiking | 32 |") == 1
    import matplotlib.image

    assert set(report["plots"]) == {"accuracy_vs_timesteps", "energy_by_layer", "firing_rates", "raster", "pareto"}
    for path in report["plots"].values():
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0.01  # not blank
    assert "spiking, T = 32" in console_table(report)


def test_cli_compare_with_synthetic_inputs(trained_run, capsys, tmp_path):
    from analog_ep.cli import main

    run, net, *_ = trained_run
    profile = tmp_path / "mine.toml"
    profile.write_text('base = "cmos45nm"\n[spiking]\nsop = 0.1\n')
    assert main(["compare", str(run), "--synthetic", "16", "--timesteps", "8", "--profile", f"loihi,{profile}",
                 "--no-plots", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["profiles"]) == {"loihi", "mine"} and report["samples"] == 16
    assert report["profiles"]["mine"]["constants"]["spiking"]["sop"] == 0.1
    assert main(["compare", str(run), "--synthetic", "8", "--timesteps", "1"]) == 2
    assert "--timesteps" in capsys.readouterr().err
