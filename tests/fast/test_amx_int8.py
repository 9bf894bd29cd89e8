"""Our AMX int8 kernels (analog_ep/fast/native/int8_amx.c) against exact integer arithmetic, and the fallback."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import amx_int8, native_kernels
from analog_ep.fast import retrieval as fast_retrieval
from analog_ep.fast.lowp_weights import Int8Weight, _quantize_rows, int8_available, int8_kernel_name

needs_amx = pytest.mark.skipif(not amx_int8.available(), reason=f"AMX kernels: {amx_int8.unavailable_reason()}")


def _exact_weight(w: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(w / torch.tensor(scale)).clamp_(-127, 127).to(torch.float64)


@needs_amx
@pytest.mark.parametrize("k, n", [(37, 203), (64, 64), (100, 1000), (40, 130), (40, 2500)])
@pytest.mark.parametrize("rows", [1, 7, 32, 50, 64])
def test_products_equal_exact_integer_arithmetic(k: int, n: int, rows: int) -> None:
    """Odd sizes exercise every padding path (rows past M, columns past N, reduction past K and N); the
    one-pass pair (`down_up`) also threads with no columns (64 x 64) and several chunks per thread (2500)."""
    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    w = torch.randn(k, n, generator=gen)
    packed = amx_int8.PackedInt8(w)
    assert packed.scale == pytest.approx(float(w.abs().max()) / 127, rel=1e-6)
    wq = _exact_weight(w, packed.scale)
    x, h = torch.randn(rows, n, generator=gen), torch.randn(rows, k, generator=gen)
    x[0] = 0.0  # a row of zeros: factor 1, all-zero codes

    qx, rx = _quantize_rows(x)
    want_up = (qx.double() @ wq.t()).float().mul_(rx * packed.scale)  # int32-exact sums, then fp32 scaling
    qh, rh = _quantize_rows(h)
    want_down = ((qh.double() @ wq).float() * packed.scale).to(torch.bfloat16)  # fp32 scaling, then bf16

    got_down, r, got_up = packed.down_up(h, x)  # before `up` alone has built the transposed layout
    assert torch.equal(r, rh) and torch.equal(got_down, want_down) and torch.equal(got_up, want_up)
    xb = x.bfloat16()  # the retrieval's state, its row maxima known: quantised inside the kernel, same codes
    assert all(torch.equal(a, b) for a, b in zip(packed.down_up(h, xb, xb.float().abs().amax(1)),
                                                 packed.down_up(h, xb)))

    assert torch.equal(packed.up(x), want_up)
    got, r = packed.down_row_scaled(h)
    assert torch.equal(r, rh)
    assert torch.equal(got, want_down)


def _pair_equals_separate_products(k: int, n: int, rows: int, seed: int) -> amx_int8.PackedInt8:
    """down_up (codes made outside and inside the kernel) against the two separate products, bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    w, h = torch.randn(k, n, generator=gen), torch.randn(rows, k, generator=gen)
    x = torch.randn(rows, n, generator=gen).bfloat16()
    packed = amx_int8.PackedInt8(w)
    want = (*packed.down_row_scaled(h), packed.up(x))
    for got in (packed.down_up(h, x), packed.down_up(h, x, x.float().abs().amax(1))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    return packed


@needs_amx
def test_the_one_pass_pair_with_many_rows_takes_longer_chunks_and_the_same_numbers() -> None:
    assert amx_int8.fused_chunk(544) > amx_int8.fused_chunk(64)
    packed = _pair_equals_separate_products(40, 2500, 520, seed=5)
    assert amx_int8.fused_rows(544, packed.Kp, packed.Np) == 544  # one call: the long chunks are used


def test_rows_are_split_only_where_the_matrix_is_cheap_to_read_again() -> None:
    assert amx_int8.fused_rows(512, 448, 30016) == 128  # SNLI's nudged rows: partial sums kept in L2
    assert amx_int8.fused_rows(64, 448, 30016) == 64
    assert amx_int8.fused_rows(256, 1024, 180032) == 256  # IMDB: W is 180 MB, read once


@needs_amx
def test_the_one_pass_pair_split_into_row_blocks_gives_the_same_numbers() -> None:
    packed = _pair_equals_separate_products(400, 700, 300, seed=6)
    assert amx_int8.fused_rows(320, packed.Kp, packed.Np) == 128  # three calls: 128, 128 and 44 rows


@needs_amx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_quantiser_matches_torch_and_pads_with_zeros(dtype: torch.dtype) -> None:
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[2] = 0.0
    q, r = amx_int8.quantize_rows(x[:, 3:], rows=32, width=80)  # a strided view: rows not contiguous in memory
    want_q, want_r = _quantize_rows(x[:, 3:])
    assert torch.equal(q[:5, :67], want_q) and torch.equal(r, want_r)
    assert not q[5:].any() and not q[:, 67:].any()
    with pytest.raises(ValueError, match="cannot hold"):
        amx_int8.quantize_rows(x, rows=4, width=70)


@needs_amx
def test_packed_buffers_are_refilled_not_reallocated() -> None:
    w = torch.randn(40, 130)
    first = amx_int8.PackedInt8(w)
    second = amx_int8.PackedInt8(w * 2, previous=first)
    assert second.down_layout.data_ptr() == first.down_layout.data_ptr()
    assert second.scale == pytest.approx(2 * first.scale)
    x = torch.randn(3, 130)
    assert torch.allclose(second.up(x), 2 * amx_int8.PackedInt8(w).up(x), rtol=1e-5, atol=1e-5)


@needs_amx
def test_bad_inputs_are_refused_with_the_reason() -> None:
    w = torch.randn(40, 130)
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        amx_int8.PackedInt8(w)
    packed = amx_int8.PackedInt8(torch.randn(40, 130))
    with pytest.raises(ValueError, match=r"\(rows, 130\)"):
        packed.up(torch.randn(3, 129))
    with pytest.raises(ValueError, match="same rows"):
        packed.down_up(torch.randn(3, 40), torch.randn(4, 130))
    with pytest.raises(ValueError, match="floating-point"):
        amx_int8.quantize_rows(torch.ones(3, 4, dtype=torch.int32), 32, 64)


@needs_amx
def test_both_int8_kernel_sets_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN fallback (`SEQEP_INT8_KERNEL=onednn`) and our kernels quantise and multiply alike."""
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 640, generator=gen), torch.randn(32, 640, generator=gen)
    h = torch.randn(32, 48, generator=gen)
    amx = Int8Weight(w)
    assert amx.kernel == "amx"
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "onednn")
    onednn = Int8Weight(w)
    assert onednn.kernel == "onednn" and "SEQEP_INT8_KERNEL" in amx_int8.unavailable_reason()
    assert torch.equal(amx.up(x), onednn.up(x))  # `amx` keeps working: a packed matrix keeps its library
    (y_amx, r_amx), (y_dnn, r_dnn) = amx.down_row_scaled(h), onednn.down_row_scaled(h)
    assert torch.equal(r_amx, r_dnn)
    assert torch.equal(y_amx, y_dnn)  # same int32 sums, same fp32 scaling, same bf16 rounding
    assert all(torch.equal(a, b) for a, b in zip(amx.down_up(h, x), onednn.down_up(h, x)))


@needs_amx
@pytest.mark.parametrize("schedule", ["alternating", "synchronous"])  # synchronous: both products in one pass
def test_training_steps_are_bit_identical_under_both_kernel_sets(monkeypatch: pytest.MonkeyPatch,
                                                                 schedule: str) -> None:
    """So runs trained with the oneDNN kernels (int8 results in docs/history.md) are what ours would produce."""
    from analog_ep.estimators import EPConfig, ep_symmetric
    from tests.helpers import random_inputs, small_net

    def trained() -> list[torch.Tensor]:
        net = small_net("imdb", schedule=schedule)
        x, y = random_inputs(net.spec, 8, dtype=torch.float32)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            ep_symmetric(net, x, y, EPConfig(0.1, 20, 8, precision="int8"))
            optimizer.step()
        assert net.low_precision_weights("int8")[0].kernel == ("onednn" if monkeypatch_active else "amx")
        assert not torch.equal(net.weights[0], small_net("imdb").weights[0])  # the steps did train
        return [p.detach().clone() for p in net.parameters()]

    monkeypatch_active = False
    ours = trained()
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "onednn")
    monkeypatch_active = True
    theirs = trained()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_a_failed_build_leaves_the_kernels_unavailable_with_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path) -> None:
    """The CPU check is passed on any machine, so the build is really attempted (with a compiler that always
    fails); every user then falls back to torch's kernels and says why."""
    monkeypatch.setenv("SEQEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.delenv("SEQEP_NATIVE", raising=False)
    monkeypatch.delenv("SEQEP_INT8_KERNEL", raising=False)
    monkeypatch.setattr(native_kernels, "_cpu_missing", lambda kernels: [])
    monkeypatch.setattr(fast_retrieval, "_COMPILED", {})
    native_kernels.forget()
    try:
        assert native_kernels.library() is None and not amx_int8.available()
        reason = native_kernels.unavailable_reason()
        assert reason.startswith("/bin/false failed to build") and "int8_amx.c" in reason
        assert amx_int8.unavailable_reason() == reason and reason in int8_kernel_name()
        avx2 = native_kernels.unavailable_reason(native_kernels.AVX2)
        assert avx2.startswith("/bin/false failed to build") and "folded_avx2.c" in avx2  # each set says why
        from analog_ep.fast.folded import _kernel_for
        assert _kernel_for(torch.float32, torch.device("cpu")) is None  # the fold's torch products
        assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left for a later process to load
        with pytest.raises(RuntimeError, match="AMX int8 kernels unavailable: /bin/false failed to build"):
            amx_int8.PackedInt8(torch.randn(4, 4))
        if int8_available():
            assert Int8Weight(torch.randn(48, 640)).kernel == "onednn"  # the oneDNN int8 kernels instead
        monkeypatch.setattr(torch, "compile", lambda kernel, **options: kernel)  # which kernels, not compiling them
        fast_retrieval.enable_compiled(True)
        assert "native" not in fast_retrieval._COMPILED and "attention" in fast_retrieval._COMPILED  # torch's
    finally:
        monkeypatch.undo()
        native_kernels.forget()


@needs_amx
def test_the_build_is_cached_per_source_version(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SEQEP_CACHE_DIR", str(tmp_path))
    native_kernels.forget()
    try:
        assert amx_int8.available()
        built = list((tmp_path / "native").glob("seqep-amx-*.so"))
        assert len(built) == 1
        native_kernels.forget()
        assert amx_int8.available() and list((tmp_path / "native").glob("seqep-amx-*.so")) == built
    finally:
        monkeypatch.undo()
        native_kernels.forget()


@needs_amx
def test_a_synchronous_step_reads_the_large_matrix_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synchronous schedule: the first synapse's two products come from one `down_up` call per step (one
    read of W), never from `up` / `down_row_scaled` alone (two reads), except the query at s* (once)."""
    from analog_ep.estimators import EPConfig, ep_symmetric
    from tests.helpers import random_inputs, small_net

    calls = {"down_up": 0, "up": 0, "down_row_scaled": 0, "x_absmax": 0}
    for name in ("down_up", "up", "down_row_scaled"):
        original = getattr(amx_int8.PackedInt8, name)

        def counted(self, *args, _original=original, _name=name):
            calls[_name] += 1
            calls["x_absmax"] += _name == "down_up" and len(args) > 2 and args[2] is not None
            return _original(self, *args)

        monkeypatch.setattr(amx_int8.PackedInt8, name, counted)
    net = small_net("imdb", schedule="synchronous")
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    monkeypatch.setattr(fast_retrieval, "_COMPILED", {})
    fast_retrieval.enable_compiled(True)  # the native retrieval, which reports its state's row maxima
    ep_symmetric(net, x, y, EPConfig(0.1, 20, 8, precision="int8"))
    # every step but each phase's first (its state was not made by the retrieval) skips the pass quantising x
    assert calls == {"down_up": 20 + 8, "up": 0, "down_row_scaled": 1, "x_absmax": 19 + 7}
