"""Every estimator the CLI offers trains, or the run says loudly that it does not (analog_ep/train/health.py)."""

from dataclasses import replace

import pytest
import torch

from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, ep_two_phase, make_estimator, training_beta_sign
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.config import RunConfig, apply_overrides
from analog_ep.train.health import LearningMonitor, constant_output_loss, not_learning, refuse_untrainable
from analog_ep.train.inner_loop import accuracy, layer_param_groups, train_step
from tests.helpers import random_inputs, tiny_net
from tests.synthetic import token_presence_task


# ---------------------------------------------------------------- the not-learning detector
def rows(loss: float, accuracy: float, n: int = 40, spread: float | None = None) -> list[dict]:
    return [{"loss": loss, "batch_accuracy": accuracy + (0.02 if i % 2 else -0.02), "output_spread": spread}
            for i in range(n)]


def test_constant_output_loss_is_that_of_the_class_prior():
    assert constant_output_loss(2) == pytest.approx(0.25)
    assert constant_output_loss(3) == pytest.approx(1 / 3)


def test_a_collapsed_epoch_is_named_with_its_numbers_and_what_to_try():
    warning = not_learning(rows(0.2501, 0.50), 2, "ep_two_phase")
    assert warning.startswith("estimator ep_two_phase is not learning: its loss sits at the constant-output value")
    assert "chance 0.500" in warning and "constant outputs give 0.2500" in warning
    assert "try more ep.free_steps" in warning
    constant = not_learning(rows(0.24, 0.51, spread=1e-5), 2, "cep")
    assert "outputs are the same for every sample" in constant and "try ep.beta_sign=random" in constant
    assert "try smaller train.lrs" in not_learning(rows(0.34, 0.33), 3, "bptt")


def test_learning_epochs_and_short_ones_pass():
    assert not_learning(rows(0.20, 0.70), 2, "ep_symmetric") is None  # above chance
    assert not_learning(rows(0.22, 0.51, spread=0.4), 2, "ep_symmetric") is None  # loss already below constant
    assert not_learning(rows(0.25, 0.50, n=5), 2, "ep_symmetric") is None  # too few batches to judge
    assert not_learning(rows(0.30, 0.45), 3, "ep_symmetric") is None  # 3 classes: 0.45 is well above 1/3


def test_monitor_judges_each_epoch_afresh_from_training_batches():
    monitor = LearningMonitor(num_classes=2, estimator="cep")
    y = torch.tensor([0, 1] * 8)
    for _ in range(20):
        monitor.add_batch(torch.full((16, 2), 0.5), y, 0.25)  # constant outputs
    assert "not learning" in monitor.epoch_end()
    for _ in range(20):
        monitor.add_batch(torch.nn.functional.one_hot(y, 2).float(), y, 0.0)  # perfect
    assert monitor.epoch_end() is None


# ---------------------------------------------------------------- β's sign
def test_beta_sign_defaults_per_estimator_and_refuses_where_it_means_nothing():
    assert training_beta_sign("ep_two_phase") == "positive"
    assert training_beta_sign("cep") == "positive"
    assert training_beta_sign("ep_two_phase", "random") == "random"
    assert training_beta_sign("ep_symmetric") == "positive"  # unused by it: its nudge is ±β already
    with pytest.raises(ConfigError, match="has no effect on estimator 'ep_symmetric'"):
        training_beta_sign("ep_symmetric", "random")
    with pytest.raises(ConfigError, match="ep.beta_sign"):
        apply_overrides(RunConfig(), ["ep.estimator=bptt", "ep.beta_sign=positive"])
    assert apply_overrides(RunConfig(), ["ep.estimator=ep_two_phase", "ep.beta_sign=random"]).ep.beta_sign == \
        "random"
    with pytest.raises(ValueError, match="beta_sign"):
        EPConfig(beta_sign="negative")


def test_random_sign_draws_both_signs_reproducibly_and_each_estimates_the_gradient():
    net = tiny_net("imdb")
    x, y = random_inputs(net.spec, 4)
    cfg = EPConfig(0.01, 30, 10)
    positive = ep_two_phase(net, x, y, cfg, set_grad=False).grads
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    draws = []
    for seed in range(4):  # draws: −, +, −, − (torch's generator)
        torch.manual_seed(seed)
        first = flat(ep_two_phase(net, x, y, replace(cfg, beta_sign="random"), set_grad=False).grads)
        torch.manual_seed(seed)
        again = flat(ep_two_phase(net, x, y, replace(cfg, beta_sign="random"), set_grad=False).grads)
        assert torch.equal(first, again)  # the run's seed decides the signs
        cos = torch.nn.functional.cosine_similarity(first, flat(positive), dim=0)
        assert cos > 0.999  # −β estimates the same gradient (to first order)
        draws.append(bool(torch.equal(first, flat(positive))))
    assert any(draws) and not all(draws)  # both signs occurred


# ---------------------------------------------------------------- what the trainer refuses
def test_cep_is_refused_for_training_runs_with_the_measured_reason():
    with pytest.raises(ConfigError, match=r"ep.estimator = cep: C-EP does not train the IMDB/SNLI models.*46.5 %"):
        refuse_untrainable("cep")
    for name in ("ep_symmetric", "ep_two_phase", "bptt", "bptt_full"):
        refuse_untrainable(name)  # these train


# ---------------------------------------------------------------- training on a tiny task
def train_token_presence(estimator: str, cfg: EPConfig, lr: float, epochs: int = 6, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x_train, y_train = token_presence_task(400, seq_len=12, dim=16, seed=0)
    x_test, y_test = token_presence_task(500, seq_len=12, dim=16, seed=1)
    net = EPNet(build_spec("imdb", seq_len=12, dim=16, hidden=(32, 10), bias_offset=1.0, gamma=0.25), seed=seed)
    optimizer = torch.optim.Adam(layer_param_groups(net, lr))
    step = make_estimator(estimator, cfg)
    for epoch in range(epochs):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 400, 32):
            train_step(net, step, x_train[order[i:i + 32]], y_train[order[i:i + 32]], optimizer)
    return accuracy(net, [(x_test, y_test)], cfg.free_steps)



def test_two_phase_ep_with_its_training_defaults_learns_token_presence():
    """The trainer's two-phase EP (β's default sign, early exit so the free phase may settle) clearly beats
    chance on the 12-token synthetic task, and the estimate's free phase is the longer one."""
    cfg = EPConfig(beta=0.1, free_steps=20, nudge_steps=8, tol=1e-4, beta_sign=training_beta_sign("ep_two_phase"))
    assert train_token_presence("ep_two_phase", cfg, lr=3e-3, epochs=4, seed=1) >= 0.85  # measured 0.998
    net = tiny_net("imdb")
    x, y = random_inputs(net.spec, 4)
    assert ep_two_phase(net, x, y, EPConfig(0.1, 3, 2, tol=1e-12), set_grad=False).free_trace.steps == 6


def test_a_free_phase_stopped_short_of_its_fixed_point_is_warned():
    from analog_ep.train.health import NOT_CONVERGED, not_converged

    assert not_converged(NOT_CONVERGED / 10, 20) is None
    warning = not_converged(0.3, 20)
    assert warning is not None and "20 steps" in warning and "raise ep.free_steps" in warning
