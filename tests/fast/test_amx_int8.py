"""Our AMX int8 kernels (analog_ep/fast/native/int8_amx.c) against exact integer arithmetic, and the fallback."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import amx_int8, native_kernels
from analog_ep.fast import retrieval as fast_retrieval
from analog_ep.fast.lowp_weights import Int8Weight, int8_available, int8_kernel_name
from tests.helpers import int8_exact_case

needs_amx = pytest.mark.skipif(not amx_int8.available(), reason=f"AMX kernels: {amx_int8.unavailable_reason()}")


@needs_amx
@pytest.mark.parametrize("k, n", [(37, 203), (64, 64), (100, 1000), (40, 130), (40, 2500)])
@pytest.mark.parametrize("rows", [1, 7, 32, 50, 64])
def test_products_equal_exact_integer_arithmetic(k: int, n: int, rows: int) -> None:
    """Odd sizes exercise every padding path (rows past M, columns past N, reduction past K and N); the
    one-pass pair (`down_up`) also threads with no columns (64 x 64) and several chunks per thread (2500)."""
    case = int8_exact_case(amx_int8.PackedInt8, k, n, rows)
    packed, x, h, rh, want_up = case["packed"], case["x"], case["h"], case["rh"], case["up"]
    want_down = case["down_sums"].to(torch.bfloat16)  # fp32 scaling, then bf16

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
def test_the_pair_refuses_rows_that_differ() -> None:
    """(The checks every int8 kernel set shares: tests/fast/test_int8_kernel_sets.py.)"""
    packed = amx_int8.PackedInt8(torch.randn(40, 130))
    with pytest.raises(ValueError, match="same rows"):
        packed.down_up(torch.randn(3, 40), torch.randn(4, 130))


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
