"""The fast path's retrieval over distinct keys equals the plain L × L Hopfield retrieval."""

import pytest
import torch

from analog_ep import fast_retrieval
from analog_ep.fast_retrieval import DistinctKeys, _distinct
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


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("max_groups", [1, 3, 8])
def test_retrieval_over_distinct_keys_is_exact(masked, max_groups):
    B, P, L, d = 5, 2, 9, 6
    keys = token_keys(B, P, L, d)
    mask = (keys != 0).any(-1) if masked else None
    g = torch.Generator().manual_seed(1)
    drive = torch.randn(B, P, L, d, generator=g, dtype=torch.float64)
    top_down = torch.randn(B, P, L, d, generator=g, dtype=torch.float64)
    dk = DistinctKeys.build(keys, mask, drive, GAMMA, torch.float64, max_groups=max_groups)
    expected = hopfield_retrieve(drive + top_down, keys, GAMMA, mask)
    torch.testing.assert_close(dk.retrieve(top_down), expected, rtol=1e-10, atol=1e-12)
    assert dk.kept_fraction < 1.0  # the words repeat: fewer score columns than L per row
    if max_groups > 1:
        assert len(dk.groups) > 1


def test_delta_retrieval_and_repeat_are_exact():
    B, P, L, d = 4, 2, 8, 5
    keys = token_keys(B, P, L, d, seed=2)
    g = torch.Generator().manual_seed(3)
    drive, q_star, delta = (torch.randn(B, P, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    dk = DistinctKeys.build(keys, None, drive, GAMMA, torch.float64, max_groups=3)
    doubled = dk.repeat(2, constants=False)
    base = DistinctKeys.repeat_weights(dk.attention(q_star), 2)
    both = torch.cat([delta, -delta])
    got = doubled.delta_retrieve(base, both)
    for sign, half in ((1, got[:B]), (-1, got[B:])):
        expected = (hopfield_retrieve(drive + q_star + sign * delta, keys, GAMMA)
                    - hopfield_retrieve(drive + q_star, keys, GAMMA))
        torch.testing.assert_close(half, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(dk.repeat(3).retrieve(torch.cat([q_star] * 3)), torch.cat([dk.retrieve(q_star)] * 3))


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


def test_keys_without_repeats_form_one_group_in_batch_order():
    keys = torch.randn(3, 2, 6, 4, dtype=torch.float64)
    dk = DistinctKeys.build(keys, None, torch.randn_like(keys), GAMMA, torch.float64)
    assert len(dk.groups) == 1 and dk.groups[0].index is None and dk.kept_fraction == 1.0
