"""End to end on a synthetic task: EP learns which tokens appear anywhere; attention is what makes it easy."""

import torch

from analog_ep.dynamics import free_phase
from analog_ep.estimators import EPConfig, make_estimator
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.inner_loop import accuracy, layer_param_groups, param_lrs, train_step
from tests.synthetic import gaussian_clusters, token_presence_task

CFG = EPConfig(beta=0.1, free_steps=20, nudge_steps=8)


def train(attention: bool, estimator: str = "ep_symmetric", epochs: int = 15, lr: float = 3e-3):
    x_train, y_train = token_presence_task(400, seq_len=12, dim=16, seed=0)
    x_test, y_test = token_presence_task(1000, seq_len=12, dim=16, seed=1)
    spec = build_spec("imdb", seq_len=12, dim=16, hidden=(32, 10), attention=attention, bias_offset=1.0, gamma=0.25)
    net = EPNet(spec, seed=0)
    optimizer = torch.optim.Adam(layer_param_groups(net, lr))
    est = make_estimator(estimator, CFG, lrs=param_lrs(optimizer, net))
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            train_step(net, est, x_train[idx], y_train[idx], optimizer)
    return net, accuracy(net, [(x_test, y_test)], CFG.free_steps), (x_test, y_test)


def test_ep_learns_token_presence_and_attention_beats_the_ablation():
    net, with_attention, (x_test, _) = train(attention=True)
    _, without_attention, _ = train(attention=False)
    assert with_attention >= 0.95
    assert with_attention - without_attention >= 0.10
    # the trained network still settles: the free phase converges
    _, trace = free_phase(net, net.prepare(x_test[:64]), 60)
    assert trace.final_residual < 1e-4


def test_cep_trains_with_local_updates_only():
    """C-EP (weights move at every nudged step, plain SGD-sized steps) learns a simple task."""
    x_train, y_train = gaussian_clusters(300, seed=1)
    x_test, y_test = gaussian_clusters(1000, seed=2)
    net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0)
    cfg = EPConfig(beta=0.2, free_steps=20, nudge_steps=8)
    before = accuracy(net, [(x_test, y_test)], cfg.free_steps)
    est = make_estimator("cep", cfg, lrs=0.03)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # never steps: C-EP applies its own updates
    for _ in range(5):
        for i in range(0, 300, 20):
            assert train_step(net, est, x_train[i:i + 20], y_train[i:i + 20], optimizer).applied
    assert accuracy(net, [(x_test, y_test)], cfg.free_steps) >= max(0.9, before + 0.3)
