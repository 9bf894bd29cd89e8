"""The fast path's retrieval over distinct keys equals the plain L × L Hopfield retrieval."""

import pytest
import torch

from analog_ep.fast import native_kernels
from analog_ep.fast import retrieval as fast_retrieval
from analog_ep.fast.retrieval import DistinctKeys, Query, _partition, distinct_keys, key_vocabulary
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
    distinct, counts, sizes = distinct_keys(keys, None)
    assert counts.sum(-1).tolist() == [10.0] * 3
    for row in range(3):
        assert sizes[row] == len(torch.unique(keys[row], dim=0))
        assert len(torch.unique(distinct[row, :sizes[row]], dim=0)) == sizes[row]
    # a hash that maps every key to the same code: the exact check catches it and keeps all keys
    monkeypatch.setattr(fast_retrieval, "_hash_direction", lambda dim: torch.zeros(dim, dtype=torch.float64))
    distinct, counts, sizes = distinct_keys(keys, None)
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


@pytest.fixture
def native_retrieval():
    """The fused kernels on (as the fast path runs), restored afterwards."""
    saved = dict(fast_retrieval._COMPILED)
    fast_retrieval._COMPILED.clear()
    fast_retrieval.enable_compiled(True)
    yield
    fast_retrieval._COMPILED.clear()
    fast_retrieval._COMPILED.update(saved)


def _bf16_retrievals(keys, mask, drive, queries, packed: bool):
    """(free retrieval, ±β nudged difference, attention weights at Q*) with bf16 operands, native or torch."""
    saved = dict(fast_retrieval._COMPILED)
    fast_retrieval._COMPILED.clear()
    if packed:
        fast_retrieval.enable_compiled(True)
    try:
        dk = DistinctKeys.build(keys.float(), mask, drive.float(), GAMMA, torch.bfloat16)
        assert all((g.packed is not None) == packed for g in dk.groups)
        top_down, q_star, delta = queries
        row_scale = torch.linspace(0.5, 2.0, keys.shape[0]).view(-1, 1)  # an int8 product's row factors
        free = dk.retrieve(Query((top_down.float() / row_scale.view(-1, 1, 1, 1)).bfloat16(), row_scale))
        weights = dk.attention(Query(q_star.bfloat16()))
        both_scale = torch.linspace(2.0, 0.5, 2 * keys.shape[0]).view(-1, 1)
        both = (torch.cat([delta, -delta]).float() / both_scale.view(-1, 1, 1, 1)).bfloat16()
        nudged = dk.repeat(2, constants=False).delta_retrieve(DistinctKeys.repeat_weights(weights, 2),
                                                              Query(both, both_scale))
        return free.double(), nudged.double(), weights
    finally:
        fast_retrieval._COMPILED.clear()
        fast_retrieval._COMPILED.update(saved)


@needs_native
@pytest.mark.parametrize("B, P, L, d, masked, grouped", [(5, 2, 9, 6, False, False), (5, 2, 9, 6, True, True),
                                                        (6, 4, 25, 40, True, False), (4, 1, 70, 33, False, True)])
def test_native_retrieval_is_as_accurate_as_torch_in_bf16(B, P, L, d, masked, grouped, monkeypatch):
    """The fused AMX retrieval (native/retrieval_amx.c) against float64, free and nudged (±β copies), with masks,
    several key groups, query blocks past 32 rows, d not a multiple of 32, and SNLI's shared key rows."""
    if grouped:
        monkeypatch.setattr(fast_retrieval, "GROUP_COST", 0.0)
    keys = token_keys(B, P, L, d, seed=B + L)
    if P == 4:  # SNLI: projections 2 and 3 read the keys of 0 and 1
        keys[:, 2:] = keys[:, :2]
    mask = (keys != 0).any(-1) if masked else None
    g = torch.Generator().manual_seed(7)
    size = 2.0 / d**0.5  # scores of order 1: softmax neither flat nor saturated
    drive, top_down, q_star = (torch.randn(B, P, L, d, generator=g, dtype=torch.float64) * size for _ in range(3))
    delta = 0.05 * size * torch.randn(B, P, L, d, generator=g, dtype=torch.float64)
    queries = (top_down, q_star, delta)
    native = _bf16_retrievals(keys, mask, drive, queries, packed=True)
    torch_ = _bf16_retrievals(keys, mask, drive, queries, packed=False)

    q_bf16 = [t.bfloat16().double() for t in (top_down, q_star, delta)]  # about the operands both paths see
    want_free = hopfield_retrieve(drive + q_bf16[0], keys, GAMMA, mask)
    base = hopfield_retrieve(drive + q_bf16[1], keys, GAMMA, mask)
    want_nudged = torch.cat([hopfield_retrieve(drive + q_bf16[1] + sign * q_bf16[2], keys, GAMMA, mask) - base
                             for sign in (1, -1)])
    for got, ref, want in ((native[0], torch_[0], want_free), (native[1], torch_[1], want_nudged)):
        error, torch_error = (got - want).norm(), (ref - want).norm()
        assert error <= 1.25 * torch_error + 1e-3 * want.norm()  # bf16 rounding of the result dominates both
        assert error <= 1e-2 * want.norm()
    for a, b in zip(native[2], torch_[2]):  # the weights at Q* that the nudged phases start from
        assert (a.double() - b.double()).abs().max() <= 2.0**-7


@needs_native
def test_native_retrieval_shares_keys_and_keeps_nan_and_empty_rows(native_retrieval):
    B, P, L, d = 3, 4, 6, 8
    keys = token_keys(B, P, L, d, seed=11).float()
    keys[:, 2:] = keys[:, :2]
    mask = torch.ones(B, P, L, dtype=torch.bool)
    mask[1, 0] = False  # a row with no key at all
    mask[1, 2] = False
    dk = DistinctKeys.build(keys, mask, torch.randn(B, P, L, d), GAMMA, torch.bfloat16)
    (group,) = dk.groups
    assert group.packed.slot.unique().numel() == B * 2 and group.keys is None  # one packed copy per sentence
    assert len(dk.repeat(2).groups) == 1  # the ±β copies: one kernel call, each key set read once for both
    top_down = torch.randn(B, P, L, d).bfloat16()
    out = dk.retrieve(Query(top_down))
    assert not out[1, 0].any() and not out[1, 2].any() and out[0].all()  # no key: zeros (nan_to_num(softmax))
    top_down[2, 1, 3, 0] = float("nan")
    out = DistinctKeys.build(keys, None, torch.randn(B, P, L, d), GAMMA, torch.bfloat16).retrieve(Query(top_down))
    assert out[2, 1, 3].isnan().all() and not out[2, 1, :3].isnan().any()  # divergence stays visible, locally


def test_a_batchs_key_vocabulary_holds_each_valid_vector_once():
    g = torch.Generator().manual_seed(3)
    words = torch.randn(5, 6, generator=g)
    keys = words[torch.tensor([0, 3, 0, 4, 3, 1, 1, 2])]
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    keys[6] = torch.randn(6, generator=g)  # masked: never enters the vocabulary
    vocab, index = key_vocabulary(keys, valid)
    assert vocab.shape == (5, 6)
    assert torch.equal(vocab[index[valid]], keys[valid]) and int(index[6]) == 0
    assert len({tuple(v.tolist()) for v in vocab}) == 5
    empty_vocab, empty_index = key_vocabulary(keys, torch.zeros(8, dtype=torch.bool))
    assert empty_vocab.shape == (1, 6) and not bool(empty_index.any())


def test_the_exact_path_retrieves_over_distinct_keys_where_words_repeat():
    """Reviews of three words over twelve positions: the exact path's free and nudged phases over the distinct
    keys reach the plain retrieval's states (float64); under autograd the plain retrieval serves."""
    from analog_ep import EPNet, build_spec, relax
    from analog_ep.dynamics import free_phase

    spec = build_spec("imdb", tiny=True, bias_offset=1.0)
    net = EPNet(spec, seed=0).double()
    g = torch.Generator().manual_seed(0)
    words = torch.randn(3, spec.dim, generator=g, dtype=torch.float64)
    x = words[torch.randint(0, 3, (4, spec.num_streams, spec.seq_len), generator=g)]
    with torch.no_grad():
        inputs, plain = net.prepare(x), net.prepare(x)
        plain.distinct = None
        assert inputs.distinct is not None and inputs.distinct.kept_fraction <= fast_retrieval.EXACT_MAX_KEPT
        fast, fast_trace = free_phase(net, inputs, 30)
        exact, exact_trace = free_phase(net, plain, 30)
        for a, b in zip(fast, exact):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        assert fast_trace.residuals == pytest.approx(exact_trace.residuals, abs=1e-12)
        target = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), spec.num_classes).double().repeat(2, 1)
        betas = torch.tensor([0.5] * 4 + [-0.5] * 4, dtype=torch.float64).view(-1, 1)
        nudged = [relax(net, *net.nudge_start(i, s, times=2), 8, beta=betas, target=target, track=False)[0]
                  for i, s in ((inputs, fast), (plain, exact))]
        for a, b in zip(*nudged):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
        random_words = net.prepare(torch.randn(4, spec.num_streams, spec.seq_len, spec.dim, dtype=torch.float64))
        assert random_words.distinct is None  # nothing repeats: the plain retrieval
    assert net.prepare(x).distinct is None  # autograd (BPTT) differentiates the plain retrieval
