"""The int8 products that follow a state's changes (analog_ep/fast/delta_int8.py, native/int8_delta_avx2.c): every
step equals the dense product of its codes (int64 arithmetic), a relaxation on them stays with the dense int8 path,
and the retrieval of the samples whose query did not change is the one they made before."""

from __future__ import annotations

import math

import pytest
import torch

from analog_ep.fast import avx2_int8, delta_int8, lowp_phi
from analog_ep.fast.delta_int8 import ChangeProducts

needs_avx2 = pytest.mark.skipif(not avx2_int8.available(), reason=f"AVX2 kernels: {avx2_int8.unavailable_reason()}")


def _dense(packed, w: torch.Tensor, products: ChangeProducts) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_h·q_W·scale, q_x·q_Wᵀ·r_x·scale) in int64 from the codes and row scales the change products hold."""
    qw = torch.round(w / packed.scale).clamp(-127, 127).to(torch.int64)
    qh = products._h.q[:, :packed.K].to(torch.int64)
    qx = products._x.q[:, :packed.N].to(torch.int64)
    rx = products._x.r.unsqueeze(1)
    return (qh @ qw).float() * packed.scale, (qx @ qw.t()).float() * (rx * packed.scale)


def _walk(k: int, n: int, rows: int, steps: int, seed: int = 0):
    """States a relaxation might visit: a few entries move, one row grows past its scale, one shrinks below it,
    one row stays zero, one is redrawn whole (many changed codes), one turns zero and back (rows > 4)."""
    g = torch.Generator().manual_seed(seed)
    h, x = torch.rand(rows, k, generator=g), torch.rand(rows, n, generator=g) - 0.5
    x[rows - 1] = 0.0
    for step in range(steps):
        if rows > 5:
            h[4] = 0.0 if step in (3, 4) else h[4] + 0.01 * (step == 5)
        yield h.clone(), x.clone()
        h[0, step % k] += 0.02
        x[min(1, rows - 1), (7 * step) % n] += 0.05
        x[min(2, rows - 1)] *= 1.5 if step % 3 == 0 else 1.0
        if rows > 3:
            x[3] *= 0.1 if step == 2 else 1.0
            h[3] = torch.rand(k, generator=g)


@needs_avx2
@pytest.mark.parametrize("k, n, rows", [(40, 256, 6), (37, 203, 5), (64, 2100, 4), (16, 4200, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_step_equals_the_dense_product_of_its_codes(k: int, n: int, rows: int, dtype: torch.dtype) -> None:
    """Odd sizes reach every tail (codes past a block of 32, outputs past a strip of 16); n = 2100 and 4200 span
    several passes over the groups of 4 (`UP_GROUPS`)."""
    w = torch.randn(k, n) * 0.05
    packed = avx2_int8.PackedInt8Avx2(w)
    products = ChangeProducts(packed, dtype)
    seen = set()
    scales = (torch.zeros(rows), torch.zeros(rows))
    for h, x in _walk(k, n, rows, 8):
        out = products.down_up(h, x)
        down, up = _dense(packed, w, products)
        assert torch.equal(out.down, down.to(dtype)) and torch.equal(out.up, up)
        for op, v, before in ((products._h, h, scales[0]), (products._x, x, scales[1])):
            codes = op.q[:, :v.shape[1]].float()  # within 0.5 + band steps of the values; plain on a new scale
            zero = op.r == 0  # zero rows: zero codes and no scale
            assert torch.equal(zero, (v == 0).all(1)) and not bool(codes[zero].any())
            r = op.r[~zero].unsqueeze(1)
            assert bool(((v[~zero] / r - codes[~zero]).abs() <= 0.5 + products.band + 1e-4).all())
            fresh = (op.r != before) & ~zero
            assert torch.equal(codes[fresh], torch.round(v[fresh] * (1 / op.r[fresh].unsqueeze(1))))
            before.copy_(op.r)
        seen.update(products._h.status.tolist() + products._x.status.tolist())
    # unchanged rows, changed groups and whole rows took place, and rows turning zero where the walk has one
    assert seen == ({0, 1, 2, 3} if rows > 5 else {0, 1, 2})


@needs_avx2
def test_zero_rows_cost_nothing() -> None:
    """A state that has not moved yet (a nudged phase's difference, the free phase's start) is zero: its rows
    multiply nothing, and a row that turns zero again only has its sums cleared."""
    w = torch.randn(24, 300) * 0.05
    packed = avx2_int8.PackedInt8Avx2(w)
    products = ChangeProducts(packed)
    h, x = torch.zeros(3, 24), torch.zeros(3, 300)
    delta_int8.reset_work()
    for _ in range(3):
        out = products.down_up(h, x)
        assert not bool(out.changed.any()) and not bool(out.down.any()) and not bool(out.up.any())
    assert delta_int8.work_done()["products"] == 0.0
    h[1], x[1] = torch.rand(24), torch.rand(300)
    out = products.down_up(h, x)
    assert out.changed.tolist() == [False, True, False]
    assert torch.equal(out.down, _dense(packed, w, products)[0]) and bool(out.up[1].any())
    h[1], x[1] = 0.0, 0.0
    out = products.down_up(h, x)  # back to zero: status 3, sums cleared, the row reported as changed
    assert products._h.status.tolist() == [0, 3, 0] and out.changed.tolist() == [False, True, False]
    assert not bool(out.down.any()) and not bool(out.up.any()) and not bool(products._x.acc.any())


@needs_avx2
@pytest.mark.parametrize("n", [64, 203])
def test_a_code_moves_only_when_its_value_leaves_the_dead_band(n: int) -> None:
    """A value hovering about a rounding boundary (code 10 ↔ 11 without the band) keeps its code; one that moves
    more than 0.5 + band steps away takes the rounded code (n = 203: the tail past the last block of 32)."""
    packed = avx2_int8.PackedInt8Avx2(torch.randn(4, n))
    products = ChangeProducts(packed, band=0.25)
    h, x = torch.full((1, 4), 0.5), torch.full((1, n), 0.5)
    x[0, 0] = 1.0  # max: r = 1/127
    x[0, n - 1] = 10.4 / 127
    products.down_up(h, x)
    assert int(products._x.q[0, n - 1]) == 10
    for value, code in ((10.6, 10), (10.7, 10), (10.4, 10), (10.8, 11), (10.4, 11), (10.2, 10)):
        x[0, n - 1] = value / 127
        products.down_up(h, x)
        assert int(products._x.q[0, n - 1]) == code, value


@needs_avx2
def test_following_the_changes_equals_recomputing_every_changed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sparse updates against the same kernels' whole-row products (same codes, same scales), bit for bit."""
    w = torch.randn(48, 3000) * 0.05

    def run(share: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        monkeypatch.setattr(delta_int8, "DENSE_SHARE", share)
        products = ChangeProducts(avx2_int8.PackedInt8Avx2(w))
        return [(out.down.clone(), out.up) for out in (products.down_up(h, x) for h, x in _walk(48, 3000, 6, 10))]

    sparse, whole = run(16), run(10 ** 9)  # max_changes = 1: nearly every changed row is recomputed whole
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(sparse, whole))


@needs_avx2
def test_a_row_keeps_its_scale_only_while_its_codes_fit() -> None:
    """Growing past 127 codes or shrinking past a factor WIDEN takes a fresh scale (the row recomputed whole);
    within that range the scale and the codes' resolution stay."""
    packed = avx2_int8.PackedInt8Avx2(torch.randn(8, 64))
    products = ChangeProducts(packed)
    h, x = torch.full((1, 8), 0.5), torch.full((1, 64), 0.5)
    products.down_up(h, x)
    r0 = float(products._x.r[0])
    for factor, kept in ((1.0, True), (0.5, True), (1.0 / delta_int8.WIDEN * 0.9, False), (2.0, False)):
        products.down_up(h, x * factor)
        assert (float(products._x.r[0]) == r0) == kept, factor
        r0 = float(products._x.r[0])


@needs_avx2
def test_bad_inputs_are_refused_with_the_reason() -> None:
    products = ChangeProducts(avx2_int8.PackedInt8Avx2(torch.randn(8, 64)))
    with pytest.raises(ValueError, match=r"x must be a CPU \(rows, 64\)"):
        products.down_up(torch.zeros(2, 8), torch.zeros(2, 63))
    with pytest.raises(ValueError, match=r"h must be a CPU \(rows, 8\)"):
        products.down(torch.zeros(2, 9))
    products.down(torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"x must be a CPU \(2, 64\) matrix \(as many rows"):
        products.up(torch.zeros(3, 64))


def _angle(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().pow(2).sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().pow(2).sum()) for k in b))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / (na * nb)))))


@needs_avx2
@pytest.mark.parametrize("schedule", ["synchronous", "alternating"])
def test_an_ep_update_on_the_change_products_stays_with_the_dense_int8_one(monkeypatch: pytest.MonkeyPatch,
                                                                           schedule: str) -> None:
    """Same weights and batch: the EP update with the change products (row scales kept across steps) within 1° of
    the dense int8 path's, and within 3° of float64's (the fast path's bound, test_lowp.py)."""
    from analog_ep.dynamics import REFINE_LAST
    from analog_ep.estimators import EPConfig, ep_symmetric
    from tests.helpers import random_inputs, small_net

    monkeypatch.setenv("SEQEP_INT8_KERNEL", "avx2")
    net = small_net("imdb", schedule=schedule)
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    cfg = EPConfig(0.1, 30, 10, precision="int8")
    calls = []
    monkeypatch.setattr(ChangeProducts, "down", _counting(ChangeProducts.down, calls))
    follow = ep_symmetric(net, x, y, cfg).grads
    # one `down` a step (synchronous: through `down_up`), but for the free phase's refinement (dense products)
    assert len(calls) >= 30 - REFINE_LAST + 10
    monkeypatch.setattr(lowp_phi, "FOLLOW_CHANGES", False)
    dense = ep_symmetric(net, x, y, cfg).grads
    exact = ep_symmetric(net.double(), x.double(), y, EPConfig(0.1, 30, 10)).grads
    assert _angle(follow, dense) < 1.0
    assert _angle(follow, exact) < 3.0


def _counting(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return counted


@needs_avx2
def test_unchanged_samples_retrieve_what_they_retrieved_before() -> None:
    """`DistinctKeys.retrieve` with `changed`: the changed samples' rows equal a whole retrieval of the new query
    (to fp32 rounding), the others are the previous result untouched; likewise the nudged phases' δ-retrieval."""
    from analog_ep.fast.retrieval import DistinctKeys, Query

    g = torch.Generator().manual_seed(0)
    batch, length, dim = 6, 30, 16
    keys = torch.randn(batch, 1, length, dim, generator=g).round()  # repeated words: fewer distinct keys
    drive = torch.randn(batch, 1, length, dim, generator=g)
    distinct = DistinctKeys.build(keys, None, drive, 0.5, torch.float32)
    q1, q2 = torch.randn(batch, 1, length, dim, generator=g), torch.randn(batch, 1, length, dim, generator=g)
    changed = torch.tensor([True, False, False, True, True, False])
    q2[~changed] = q1[~changed]
    first = distinct.retrieve(Query(q1))
    again = distinct.retrieve(Query(q2, None, changed), previous=first)
    whole = distinct.retrieve(Query(q2))
    assert torch.equal(again[~changed], first[~changed])
    assert torch.allclose(again[changed], whole[changed], atol=1e-6, rtol=0)
    base = distinct.attention(Query(q1))
    d1 = distinct.delta_retrieve(base, Query(q1 * 0.01))
    d2 = distinct.delta_retrieve(base, Query(q2 * 0.01, None, changed), previous=d1)
    assert torch.equal(d2[~changed], d1[~changed])
    assert torch.allclose(d2[changed], distinct.delta_retrieve(base, Query(q2 * 0.01))[changed], atol=1e-7, rtol=0)


@needs_avx2
def test_the_band_holds_for_the_planned_steps_then_codes_round_plainly() -> None:
    """`band_steps`: the free phase's codes keep the dead band up to its last steps (`lowp_phi.PLAIN_LAST`), then
    round plainly, so that the fixed point the nudged phases start from is plainly rounded."""
    packed = avx2_int8.PackedInt8Avx2(torch.randn(4, 64))
    products = ChangeProducts(packed, band=0.25, band_steps=3)
    h, x = torch.full((1, 4), 0.5), torch.full((1, 64), 0.5)
    x[0, 0] = 1.0  # r = 1/127
    for value in (10.4, 10.7, 10.7):  # call 1 on a new scale (plain), calls 2-3 banded: the code stays
        x[0, 5] = value / 127
        products.down_up(h, x)
        assert int(products._x.q[0, 5]) == 10
    assert products.calls == 3
    products.down_up(h, x)
    assert int(products._x.q[0, 5]) == 11


@needs_avx2
def test_a_free_phase_plans_its_band_and_the_nudged_phases_keep_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from analog_ep.dynamics import free_phase
    from analog_ep.estimators import EPConfig, ep_symmetric
    from tests.helpers import random_inputs, small_net

    monkeypatch.setenv("SEQEP_INT8_KERNEL", "avx2")
    net = small_net("imdb", schedule="synchronous")
    x, y = random_inputs(net.spec, 4, dtype=torch.float32)
    inputs = net.prepare(x, "int8")
    free_phase(net, inputs, 12, track=False)
    assert inputs.lowp.changes.band_steps == 12 - lowp_phi.PLAIN_LAST and inputs.lowp.changes.calls == 12
    inputs = net.prepare(x, "int8")
    free_phase(net, inputs, 12, tol=1e-4, track=False)
    assert inputs.lowp.changes.band_steps == 0  # may stop early: plain rounding throughout
    bands = []
    init = ChangeProducts.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        bands.append(self.band_steps)

    monkeypatch.setattr(ChangeProducts, "__init__", recorded)
    ep_symmetric(net, x, y, EPConfig(0.1, 12, 4, precision="int8"))
    # the free phase banded up to its ending in the difference form (`dynamics.REFINE_LAST` steps, planned plain),
    # then the ±β phases banded throughout
    assert bands == [12 - lowp_phi.PLAIN_LAST, 0, None]
