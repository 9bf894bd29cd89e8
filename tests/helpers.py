"""Shared test helpers: tiny networks of each paper shape and random inputs for them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from analog_ep.models import build_spec
from analog_ep.phi import EPNet

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def real_data_dir() -> Path | None:
    """The real data folder for `realdata` tests: $SEQEP_DATA_DIR, else ../shared/data beside the clone."""
    env = os.environ.get("SEQEP_DATA_DIR")
    candidate = Path(env) if env else SHARED_DATA
    return candidate.resolve() if (candidate / "imdb").is_dir() else None


TINY_VARIANTS = {
    "imdb": dict(model="imdb"),
    "snli": dict(model="snli"),
    "mlp": dict(model="mlp"),
    "imdb_pooled": dict(model="imdb", pool_queries=3, mask_padding=True),
}


def tiny_net(name: str, dtype: torch.dtype = torch.float64) -> EPNet:
    """A tiny network of one `TINY_VARIANTS` shape, units started mid-range (bias offset 1)."""
    options = dict(TINY_VARIANTS[name])
    spec = build_spec(options.pop("model"), tiny=True, bias_offset=1.0, **options)
    return EPNet(spec, seed=0).to(dtype)


def small_net(model: str = "imdb", **options) -> EPNet:
    """Big enough that the first synapse (proj → FC1) takes the bf16 path (≥ LOWP_MIN_WEIGHTS weights)."""
    sizes = dict(seq_len=40, dim=32, hidden=(64, 10)) if model == "imdb" else dict(seq_len=12, dim=32, hidden=(64,))
    sizes.update(options)
    return EPNet(build_spec(model, bias_offset=1.0, **sizes), seed=0)


def trained_tiny_imdb() -> tuple[EPNet, tuple[torch.Tensor, torch.Tensor]]:
    """A tiny IMDB-shaped network trained 5 epochs of symmetric EP on the token-presence task, + test data."""
    from analog_ep.estimators import EPConfig, make_estimator
    from analog_ep.train.inner_loop import layer_param_groups, train_step
    from tests.synthetic import token_presence_task

    torch.manual_seed(0)
    x_train, y_train = token_presence_task(400, seq_len=12, dim=16, seed=0)
    spec = build_spec("imdb", seq_len=12, dim=16, hidden=(32, 10), bias_offset=1.0, gamma=0.25)
    net = EPNet(spec, seed=0)
    optimizer = torch.optim.Adam(layer_param_groups(net, 3e-3))
    est = make_estimator("ep_symmetric", EPConfig(beta=0.1, free_steps=20, nudge_steps=8))
    for epoch in range(5):
        order = torch.randperm(400, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, 400, 32):
            train_step(net, est, x_train[order[i:i + 32]], y_train[order[i:i + 32]], optimizer)
    return net, token_presence_task(200, seq_len=12, dim=16, seed=1)


def random_inputs(spec, batch: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g, dtype=dtype)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return x, y


def int8_exact_case(packer, k: int, n: int, rows: int) -> dict[str, torch.Tensor]:
    """A random (k × n) weight packed by one of our int8 kernel sets (`packer`), rows of x (the first all zeros) and
    h, and what the products must give: int64 sums of the same codes (exact in int32), then the fp32 scaling
    (`up`; `down_sums` before any bf16 rounding) and the rows' factors of h (`rh`)."""
    from analog_ep.fast.lowp_weights import _quantize_rows

    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    w = torch.randn(k, n, generator=gen)
    packed = packer(w)
    assert abs(packed.scale - float(w.abs().max()) / 127) <= 1e-6 * packed.scale
    wq = torch.round(w / torch.tensor(packed.scale)).clamp_(-127, 127).to(torch.int64)
    x, h = torch.randn(rows, n, generator=gen), torch.randn(rows, k, generator=gen)
    x[0] = 0.0  # a row of zeros: factor 1, all-zero codes
    qx, rx = _quantize_rows(x)
    qh, rh = _quantize_rows(h)
    return {"packed": packed, "x": x, "h": h, "rh": rh,
            "up": (qx.to(torch.int64) @ wq.t()).float().mul_(rx * packed.scale),
            "down_sums": (qh.to(torch.int64) @ wq).float() * packed.scale}
