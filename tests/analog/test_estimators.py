"""EP, symmetric EP, C-EP and BPTT: agreement (GDU), convergence, and the estimator interface."""

import argparse
from dataclasses import replace

import pytest
import torch

from analog_ep import reference
from analog_ep.dynamics import free_phase
from analog_ep.errors import ConfigError
from analog_ep.estimators import (
    BUILTIN_ESTIMATORS,
    ESTIMATORS,
    EPConfig,
    cep,
    cep_on_copy,
    ep_symmetric,
    ep_two_phase,
    make_estimator,
    register_estimator,
    unregister_estimator,
)
from analog_ep.gdu import angle_deg, compare_grads, gdu_curve, gdu_report
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from tests.helpers import random_inputs


def flat(grads):
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


@pytest.mark.parametrize("model,beta,free,nudge", [("imdb", 0.1, 50, 25), ("snli", 0.1, 60, 30)])
def test_gdu_symmetric_ep_tracks_bptt_better_than_two_phase(model, beta, free, nudge):
    net = EPNet(build_spec(model, tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 32)
    report = gdu_report(net, x, y, EPConfig(beta, free, nudge))
    sym, two = report["ep_symmetric"], report["ep_two_phase"]
    assert sym["angle_deg"] <= 10.0
    assert sym["angle_deg"] < two["angle_deg"]
    for layer, stats in sym["layers"].items():
        assert stats["rel_rms_error"] <= two["layers"][layer]["rel_rms_error"] + 1e-9, layer
        assert stats["sign_agreement"] > 0.9
    assert report["config"]["free_phase_final_residual"] < 1e-8


def test_ep_becomes_exact_as_beta_shrinks(tiny_net64):
    x, y = random_inputs(tiny_net64.spec, 8)
    angles = [gdu_report(tiny_net64, x, y, EPConfig(b, 60, 20))["ep_symmetric"]["angle_deg"] for b in (0.2, 0.002)]
    assert angles[1] < 0.1
    assert angles[1] < angles[0]


def test_gdu_curve_is_stepwise_exact_for_synchronous_updates():
    """Ernoult et al.'s GDU property: EP's k-th nudged step equals BPTT over the last k steps (β → 0)."""
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0, schedule="synchronous"), seed=0).double()
    x, y = random_inputs(net.spec, 8)
    curve = gdu_curve(net, x, y, EPConfig(0.001, 40, 6))
    assert curve["steps"] == list(range(1, 7))
    for errs in curve["rel_rms_error"]["ep_symmetric"].values():
        assert len(errs) == 6 and max(errs) < 1e-3


def test_gdu_curve_converges_for_alternating_updates():
    """With the alternating schedule the step-wise identity holds only asymptotically in k."""
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 8)
    curve = gdu_curve(net, x, y, EPConfig(0.001, 40, 8))
    for errs in curve["rel_rms_error"]["ep_symmetric"].values():
        assert errs[-1] < 1e-2 and errs[-1] <= max(errs)


def test_symmetric_ep_matches_autograd_reference_implementation():
    net = EPNet(build_spec("snli", tiny=True, bias_offset=1.0), seed=1).double()
    x, y = random_inputs(net.spec, 5)
    fast = ep_symmetric(net, x, y, EPConfig(0.2, 30, 10), set_grad=False).grads
    slow = reference.reference_ep_symmetric(net, x, y, 0.2, 30, 10)
    for name in slow:
        torch.testing.assert_close(fast[name], slow[name])


def test_cep_with_small_lr_tracks_two_phase_ep(tiny_net64):
    x, y = random_inputs(tiny_net64.spec, 16)
    cfg = EPConfig(0.1, 50, 20)
    before = {n: p.detach().clone() for n, p in tiny_net64.named_parameters()}
    continual = cep_on_copy(tiny_net64, x, y, cfg, lr=1e-6)
    for n, p in tiny_net64.named_parameters():  # the copy moved, the original did not
        assert torch.equal(p, before[n])
    ep = ep_two_phase(tiny_net64, x, y, cfg, set_grad=False)
    assert angle_deg(flat(continual.grads), flat(ep.grads)) < 1.0
    assert continual.applied


def test_cep_moves_weights_by_minus_lr_times_its_estimate():
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 4)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    est = cep(net, x, y, EPConfig(0.1, 30, 5), lrs=1e-3)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach() - before[n], -1e-3 * est.grads[n])
        assert p.grad is None


@pytest.mark.parametrize("name", ["ep_symmetric", "ep_two_phase", "bptt", "bptt_full"])
def test_estimators_leave_grad_on_parameters(name):
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0)
    x, y = random_inputs(net.spec, 4, dtype=torch.float32)
    est = make_estimator(name, EPConfig(0.1, 20, 5))(net, x, y)
    for n, p in net.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, est.grads[n])
    assert est.output.shape == (4, 2) and est.loss > 0


def test_truncated_bptt_equals_full_bptt_on_a_converged_free_phase():
    """From a fixed point, earlier steps add nothing: truncation to the last K steps is exact enough."""
    net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 8)
    cfg = EPConfig(0.1, 60, 20)
    t = make_estimator("bptt", cfg)(net, x, y).grads
    f = make_estimator("bptt_full", cfg)(net, x, y).grads
    assert angle_deg(flat(t), flat(f)) < 1e-3


def test_unknown_estimator_and_cep_without_lr_are_errors():
    with pytest.raises(ConfigError, match="unknown estimator 'ep_magic'; choose one of ep_symmetric, ep_two_phase, "
                                          "cep, bptt, bptt_full"):
        make_estimator("ep_magic", EPConfig())
    with pytest.raises(ConfigError, match="learning rates"):
        make_estimator("cep", EPConfig())


@pytest.fixture
def registered():
    """Names registered by a test, forgotten afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_estimator(name)


def test_a_registered_estimator_is_made_by_name_and_listed_with_the_built_in_ones(registered):
    calls = []

    def halved_beta(net, x, labels, cfg):
        calls.append(cfg.beta)
        return ep_symmetric(net, x, labels, replace(cfg, beta=cfg.beta / 2))

    assert register_estimator("ep_halved_beta", halved_beta) is halved_beta
    registered.append("ep_halved_beta")
    assert "ep_halved_beta" in ESTIMATORS and list(ESTIMATORS)[:5] == list(BUILTIN_ESTIMATORS)
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 4)
    got = make_estimator("ep_halved_beta", EPConfig(0.2, 20, 5))(net, x, y).grads
    want = make_estimator("ep_symmetric", EPConfig(0.1, 20, 5))(net, x, y).grads
    assert calls == [0.2]
    for name in want:
        assert torch.equal(got[name], want[name])
    # configs and the CLI take their choices from the same registry
    from analog_ep.train.config import RunConfig

    assert RunConfig.from_dict({"ep": {"estimator": "ep_halved_beta"}}).ep.estimator == "ep_halved_beta"
    parser = argparse.ArgumentParser()
    parser.add_argument("--estimator", choices=ESTIMATORS)
    assert parser.parse_args(["--estimator", "ep_halved_beta"]).estimator == "ep_halved_beta"
    unregister_estimator("ep_halved_beta")
    with pytest.raises(ConfigError, match="unknown estimator 'ep_halved_beta'"):
        make_estimator("ep_halved_beta", EPConfig())


def test_a_registered_estimator_can_ask_for_learning_rates(registered):
    seen = {}

    def with_lrs(net, x, labels, cfg, lrs):
        seen["lrs"] = lrs
        return cep(net, x, labels, cfg, lrs)

    register_estimator("my_cep", with_lrs, needs_lrs=True)
    registered.append("my_cep")
    with pytest.raises(ConfigError, match="needs per-parameter learning rates"):
        make_estimator("my_cep", EPConfig())
    net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 4)
    assert make_estimator("my_cep", EPConfig(0.1, 20, 5), lrs=1e-3)(net, x, y).applied
    assert seen["lrs"] == 1e-3


def test_registering_refuses_taken_names_and_bad_entries(registered):
    with pytest.raises(ConfigError, match="already registered.*overwrite=True"):
        register_estimator("ep_symmetric", ep_two_phase)
    with pytest.raises(ConfigError, match="not callable"):
        register_estimator("mine", "ep_symmetric")
    with pytest.raises(ConfigError, match="non-empty string"):
        register_estimator("", ep_symmetric)
    with pytest.raises(ConfigError, match="built in"):
        unregister_estimator("bptt")
    register_estimator("mine", ep_symmetric)
    registered.append("mine")
    register_estimator("mine", ep_two_phase, overwrite=True)
    assert ESTIMATORS["mine"].fn is ep_two_phase
    with pytest.raises(TypeError):
        ESTIMATORS["other"] = ep_symmetric  # the view is read-only: names enter through register_estimator


def test_free_phase_converges_on_an_untrained_network(tiny_net64):
    x, _ = random_inputs(tiny_net64.spec, 16)
    _, trace = free_phase(tiny_net64, tiny_net64.prepare(x), 60)
    assert trace.residuals[0] > 1e-2
    assert trace.final_residual < 1e-6 * trace.residuals[0]


def test_free_phase_early_exit_on_tolerance():
    net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0)
    x, _ = random_inputs(net.spec, 8, dtype=torch.float32)
    _, trace = free_phase(net, net.prepare(x), 200, tol=1e-4)
    assert trace.steps < 200 and trace.final_residual < 1e-4


def test_compare_grads_reports_per_layer():
    a = {"w": torch.tensor([1.0, -1.0]), "b": torch.tensor([2.0])}
    b = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    report = compare_grads(a, b, {"w": "fc1", "b": "out"})
    assert report["layers"]["fc1"]["sign_agreement"] == 0.5
    assert report["layers"]["out"]["rel_rms_error"] == 0.0
    assert report["layers"]["fc1"]["angle_deg"] == pytest.approx(90.0)
