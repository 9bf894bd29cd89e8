"""The fused fp32 retrieval on AVX2 (analog_ep/fast/native/retrieval_avx2.c) against torch's batched products and
softmax over the same distinct keys, and the rule that chooses it."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import native_kernels, retrieval
from analog_ep.fast.retrieval import DistinctKeys, Query
from analog_ep.gdu import angle_deg

needs_avx2 = pytest.mark.skipif(native_kernels.library(native_kernels.AVX2) is None,
                                reason=f"AVX2 kernels: {native_kernels.unavailable_reason(native_kernels.AVX2)}")


@pytest.fixture
def kernels(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The retrieval's kernel switches, restored after the test."""
    monkeypatch.setattr(retrieval, "_COMPILED", {})
    return retrieval._COMPILED


def _both(dk: DistinctKeys, query: Query, kernels: dict) -> tuple[torch.Tensor, torch.Tensor]:
    kernels.clear()
    want = dk.retrieve(query)
    kernels["fp32"] = True
    return dk.retrieve(query), want


@needs_avx2
@pytest.mark.parametrize("batch, proj, length, queries, dim, with_drive", [
    (3, 1, 37, 5, 13, False),  # odd keys and channels: every tail of the 16-wide tiles
    (4, 2, 50, 50, 20, True),  # a constant per query, and a per-row factor
    (6, 1, 200, 8, 50, False),  # pooled queries, the imdb `cpu` preset's kind of shape
    (2, 1, 9, 7, 16, True),  # fewer keys than a tile
])
def test_fused_retrieval_equals_torchs(kernels, batch, proj, length, queries, dim, with_drive) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + length)
    keys = torch.randn(batch, proj, length, dim, generator=gen)
    keys[:, :, length // 2:] = keys[:, :, :1]  # repeated keys: counts above 1
    mask = torch.rand(batch, proj, length, generator=gen) > 0.2
    mask[0, 0] = False  # a row with no key at all: it retrieves zeros
    drive = torch.randn(batch, proj, queries, dim, generator=gen) if with_drive else None
    dk = DistinctKeys.build(keys, mask, drive, 0.3, torch.float32, query_len=queries)
    scale = torch.rand(batch, 1, generator=gen) + 0.5 if with_drive else None
    got, want = _both(dk, Query(torch.randn(batch, proj, queries, dim, generator=gen), scale), kernels)
    assert torch.allclose(got, want, rtol=1e-5, atol=2e-6)
    assert not got[0, 0].any()


@needs_avx2
def test_several_groups_are_written_into_their_rows(kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retrieval, "GROUP_COST", 0.0)  # one group per distinct count
    keys = torch.randn(8, 1, 120, 24, generator=torch.Generator().manual_seed(2))
    for b in range(8):
        keys[b, 0, (b + 1) * 10:] = keys[b, 0, :1]
    dk = DistinctKeys.build(keys, None, None, 0.3, torch.float32, query_len=16)
    assert len(dk.groups) > 2
    got, want = _both(dk, Query(torch.randn(8, 1, 16, 24)), kernels)
    assert torch.allclose(got, want, rtol=1e-5, atol=2e-6)


@needs_avx2
def test_many_queries_and_float64_stay_with_torch(kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past FUSED_MAX_QUERIES MKL's blocked products win (docs/history.md); float64 is the tests' oracle."""
    monkeypatch.setattr(retrieval, "_retrieve_fp32", lambda *args: pytest.fail("torch's products expected"))
    kernels["fp32"] = True
    many = retrieval.FUSED_MAX_QUERIES + 1
    keys = torch.randn(2, 1, 30, 8)
    DistinctKeys.build(keys, None, None, 0.3, torch.float32, query_len=many).retrieve(Query(torch.randn(2, 1, many, 8)))
    DistinctKeys.build(keys.double(), None, None, 0.3, torch.float64, query_len=4).retrieve(
        Query(torch.randn(2, 1, 4, 8, dtype=torch.float64)))


@needs_avx2
def test_an_exact_path_update_with_the_fused_retrieval_matches_torchs(kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    from analog_ep.estimators import EPConfig, ep_symmetric
    from tests.helpers import random_inputs, small_net

    net = small_net("imdb")
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    x[:, :, 10:] = x[:, :, :1]  # repeated tokens: the exact path retrieves over distinct keys

    def update() -> torch.Tensor:
        net.zero_grad()
        ep_symmetric(net, x, y, EPConfig(0.1, 30, 10))
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    want = update()
    kernels["fp32"] = True
    calls = []
    original = retrieval._retrieve_fp32
    monkeypatch.setattr(retrieval, "_retrieve_fp32", lambda *args: calls.append(1) or original(*args))
    got = update()
    assert calls, "the fused retrieval did not run"
    # both are fp32 relaxations whose rounding differs; the yardstick is how far either is from float64
    net64 = small_net("imdb").double()
    net64.load_state_dict({k: v.double() for k, v in net.state_dict().items()})
    net64.zero_grad()
    ep_symmetric(net64, x.double(), y, EPConfig(0.1, 30, 10))
    exact = torch.cat([p.grad.flatten() for p in net64.parameters()]).float()
    assert angle_deg(got, exact) <= 2 * angle_deg(want, exact) + 1e-3  # measured: 0.062° against 0.060°
