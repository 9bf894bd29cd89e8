"""The fast path's retrieval over distinct keys equals the plain L × L Hopfield retrieval."""

import pytest
import torch

from analog_ep import fast_retrieval, native_kernels
from analog_ep.fast_retrieval import DistinctKeys, Query, _distinct, _partition
from analog_ep.hopfield import hopfield_retrieve

GAMMA = 0.4


def token_keys(batch: int, proj: int, length: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Keys as embedded token sequences: words from a small vocabulary (so they repeat), zero padding of a
    different length per row, one row with a single repeated word, one all padding."""
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randn(7, dim, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 7, (batch, proj, length), generator=g)
    keys = vocab[ids]
    for row, real in enumerate(torch.randint(1, length + 1, (batch * proj,), generator=g).tolist()):
        keys.view(-1, length, dim)[row, real:] = 0
    keys[0, 0] = vocab[3]
    keys[-1, -1] = 0
    return keys


@pytest.fixture
def many_groups(monkeypatch):
    """Groups cost nothing: every row with its own distinct-key count becomes a group of its own."""
    monkeypatch.setattr(fast_retrieval, "GROUP_COST", 0.0)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_retrieval_over_distinct_keys_is_exact(masked, grouped, monkeypatch):
    if grouped:
        monkeypatch.setattr(fast_retrieval, "GROUP_COST", 0.0)
    B, P, L, d = 5, 2, 9, 6
    keys = token_keys(B, P, L, d)
    mask = (keys != 0).any(-1) if masked else None
    g = torch.Generator().manual_seed(1)
    drive = torch.randn(B, P, L, d, generator=g, dtype=torch.float64)
    top_down = torch.randn(B, P, L, d, generator=g, dtype=torch.float64)
    dk = DistinctKeys.build(keys, mask, drive, GAMMA, torch.float64)
    expected = hopfield_retrieve(drive + top_down, keys, GAMMA, mask)
    torch.testing.assert_close(dk.retrieve(Query(top_down)), expected, rtol=1e-10, atol=1e-12)
    row_scale = torch.rand(B, 1, generator=g, dtype=torch.float64) + 0.5  # an int8 product's row factors
    scaled = Query(top_down / row_scale.view(B, 1, 1, 1), row_scale)
    torch.testing.assert_close(dk.retrieve(scaled), expected, rtol=1e-10, atol=1e-12)
    assert dk.kept_fraction < 1.0  # the words repeat: fewer score columns than L per row
    assert (len(dk.groups) > 1) == grouped


def test_delta_retrieval_and_repeat_are_exact(many_groups):
    B, P, L, d = 4, 2, 8, 5
    keys = token_keys(B, P, L, d, seed=2)
    g = torch.Generator().manual_seed(3)
    drive, q_star, delta = (torch.randn(B, P, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    dk = DistinctKeys.build(keys, None, drive, GAMMA, torch.float64)
    assert len(dk.groups) > 1
    doubled = dk.repeat(2, constants=False)
    base = DistinctKeys.repeat_weights(dk.attention(Query(q_star)), 2)
    both = torch.cat([delta, -delta])
    row_scale = torch.linspace(0.5, 2.0, 2 * B, dtype=torch.float64).view(-1, 1)
    got = doubled.delta_retrieve(base, Query(both / row_scale.view(-1, 1, 1, 1), row_scale))
    for sign, half in ((1, got[:B]), (-1, got[B:])):
        expected = (hopfield_retrieve(drive + q_star + sign * delta, keys, GAMMA)
                    - hopfield_retrieve(drive + q_star, keys, GAMMA))
        torch.testing.assert_close(half, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(dk.repeat(3).retrieve(Query(torch.cat([q_star] * 3))),
                               torch.cat([dk.retrieve(Query(q_star))] * 3))


def test_distinct_counts_and_fallback_on_collision(monkeypatch):
    keys = token_keys(3, 1, 10, 4, seed=4).view(3, 10, 4)
    distinct, counts, sizes = _distinct(keys, None)
    assert counts.sum(-1).tolist() == [10.0] * 3
    for row in range(3):
        assert sizes[row] == len(torch.unique(keys[row], dim=0))
        assert len(torch.unique(distinct[row, :sizes[row]], dim=0)) == sizes[row]
    # a hash that maps every key to the same code: the exact check catches it and keeps all keys
    monkeypatch.setattr(fast_retrieval, "_hash_direction", lambda dim: torch.zeros(dim, dtype=torch.float64))
    distinct, counts, sizes = _distinct(keys, None)
    assert torch.equal(distinct, keys) and sizes.tolist() == [10] * 3 and torch.all(counts == 1)


def test_keys_without_repeats_form_one_group(many_groups):
    keys = torch.randn(3, 2, 6, 4, dtype=torch.float64)
    dk = DistinctKeys.build(keys, None, torch.randn_like(keys), GAMMA, torch.float64)
    assert len(dk.groups) == 1 and dk.groups[0].rows == slice(0, 6) and dk.kept_fraction == 1.0


def test_partition_follows_the_cost_model():
    # IMDB-sized rows: a long review is not padded onto short ones; SNLI-sized rows: one group
    sizes = [100, 110, 105, 400, 120, 90]
    groups = _partition(sizes, 600, 300)
    assert slice(3, 4) in groups and sum(g.stop - g.start for g in groups) == len(sizes)
    assert _partition([5, 25, 7, 12] * 256, 25, 300) == [slice(0, 1024)]


needs_native = pytest.mark.skipif(native_kernels.library() is None,
                                  reason=f"native kernels: {native_kernels.unavailable_reason()}")


def _within_a_bf16_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal up to one rounding of the bf16 output (2⁻⁸ relative), plus a floor for values near 0."""
    g, w = got.double(), want.double()
    return bool(((g - w).abs() <= 2.0**-8 * w.abs() + 1e-6 * w.abs().max()).all())


@needs_native
@pytest.mark.parametrize("n, lq, u", [(3, 4, 17), (33, 25, 25), (4, 60, 40), (2, 5, 3)])
@pytest.mark.parametrize("scaled", [False, True])
def test_native_softmax_kernels_match_the_eager_ones(n: int, lq: int, u: int, scaled: bool) -> None:
    """The AVX-512 kernels (native/softmax_avx512.c) against their eager twins, with −∞ (padding) columns."""
    gen = torch.Generator().manual_seed(n * lq + u)
    const = torch.randn(n, lq, u, generator=gen) * 3
    const[0, :, -1] = float("-inf")
    partial = torch.randn(n, lq, u, generator=gen).bfloat16()
    scale = torch.rand(n, 1, 1, generator=gen) + 0.5 if scaled else None
    attention = fast_retrieval._attention_native(const, partial, scale, False)
    assert _within_a_bf16_step(attention, fast_retrieval._attention_eager(const, partial, scale, False))
    assert not attention[0, :, -1].any()  # a padding column takes exactly no weight

    delta = (torch.randn(n, lq, u, generator=gen) * 0.01).bfloat16()
    got = fast_retrieval._delta_attention_native(attention, delta, scale)
    eager = fast_retrieval._delta_attention_eager(attention, delta, scale)
    s = delta.double() * (1.0 if scale is None else scale.double())
    a = attention.double()
    exact = a * s.exp() / (a * s.exp()).sum(-1, keepdim=True) - a / a.sum(-1, keepdim=True)
    error, eager_error = (got.double() - exact).norm(), (eager.double() - exact).norm()
    assert error <= 4e-3 * exact.norm()  # no cancellation: accurate relative to the small change itself
    assert error <= 1.25 * eager_error  # and as accurate as the eager kernel (elementwise, entries near 0 differ)


@needs_native
def test_native_softmax_kernels_keep_nan_and_empty_rows_as_torch_does() -> None:
    empty, zeros = torch.full((2, 3, 5), float("-inf")), torch.zeros(2, 3, 5).bfloat16()
    assert not fast_retrieval._attention_native(empty, zeros, None, True).any()  # has_empty: rows of zeros
    assert fast_retrieval._attention_native(empty, zeros, None, False).isnan().all()
    const = torch.randn(2, 3, 5)
    const[1, 1, 2] = float("nan")
    out = fast_retrieval._attention_native(const, zeros, None, False)
    assert out[1, 1].isnan().all() and not out[0].isnan().any()  # divergence stays visible
    attention = torch.softmax(torch.randn(2, 3, 5), -1).bfloat16()
    delta = torch.randn(2, 3, 5).bfloat16()
    delta[0, 0, 0] = float("nan")
    assert fast_retrieval._delta_attention_native(attention, delta, None)[0, 0].isnan().any()


def test_native_softmax_kernels_hand_other_dtypes_to_the_eager_ones() -> None:
    """float64 (the GDU check, float64 oracles) is not what the C kernels take: same numbers as eager."""
    const, partial = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.equal(fast_retrieval._attention_native(const, partial, None, False),
                       fast_retrieval._attention_eager(const, partial, None, False))
    attention = torch.softmax(partial, -1)
    assert torch.equal(fast_retrieval._delta_attention_native(attention, partial * 0.01, None),
                       fast_retrieval._delta_attention_eager(attention, partial * 0.01, None))
