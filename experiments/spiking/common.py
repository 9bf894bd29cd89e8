"""Shared helpers of the spiking studies: a tiny analog model trained on the synthetic token-presence task."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from synthetic import token_presence_task  # noqa: E402

from analog_ep.estimators import EPConfig, make_estimator  # noqa: E402
from analog_ep.models import build_spec  # noqa: E402
from analog_ep.phi import EPNet  # noqa: E402
from analog_ep.train.checkpoint import load_model, save_model  # noqa: E402
from analog_ep.train.inner_loop import accuracy, layer_param_groups, param_lrs, train_step  # noqa: E402

CFG = EPConfig(beta=0.1, free_steps=20, nudge_steps=8)
SEQ_LEN, DIM = 12, 16


def test_set(n: int = 1000, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return token_presence_task(n, seq_len=SEQ_LEN, dim=DIM, seed=seed)


def train_tiny(epochs: int = 15, seed: int = 0, hidden: tuple[int, ...] = (32, 10)) -> EPNet:
    """The model of tests/test_training_synthetic.py (symmetric EP, ~99 % test accuracy in seconds)."""
    torch.manual_seed(seed)
    x_train, y_train = token_presence_task(400, seq_len=SEQ_LEN, dim=DIM, seed=0)
    spec = build_spec("imdb", seq_len=SEQ_LEN, dim=DIM, hidden=hidden, bias_offset=1.0, gamma=0.25)
    net = EPNet(spec, seed=seed)
    optimizer = torch.optim.Adam(layer_param_groups(net, 3e-3))
    est = make_estimator("ep_symmetric", CFG, lrs=param_lrs(optimizer, net))
    for epoch in range(epochs):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            train_step(net, est, x_train[idx], y_train[idx], optimizer)
    return net


def tiny_model(cache: Path = Path("/tmp/seqep_spiking_tiny.pt")) -> EPNet:
    """Train once, then reuse the checkpoint."""
    if cache.is_file():
        return load_model(cache)[0]
    net = train_tiny()
    save_model(cache, net)
    return net


if __name__ == "__main__":
    net = tiny_model()
    x, y = test_set()
    print("analog accuracy", accuracy(net, [(x, y)], 50))
