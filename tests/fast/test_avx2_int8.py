"""Our AVX2 int8 kernels (analog_ep/fast/native/int8_avx2.c) against exact integer arithmetic and against the other
int8 kernel set that runs on the same machine (oneDNN's)."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import avx2_int8
from analog_ep.fast.lowp_weights import Int8Weight, _quantize_rows, int8_available, int8_kernel, int8_kernel_name

needs_avx2 = pytest.mark.skipif(not avx2_int8.available(), reason=f"AVX2 kernels: {avx2_int8.unavailable_reason()}")


@pytest.fixture
def avx2_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our AVX2 kernels even on an AMX machine (`SEQEP_INT8_KERNEL=avx2`)."""
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "avx2")


def _codes(w: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(w / torch.tensor(scale)).clamp_(-127, 127).to(torch.int64)


@needs_avx2
@pytest.mark.parametrize("k, n", [(37, 203), (64, 64), (100, 1000), (40, 130), (16, 2100)])
@pytest.mark.parametrize("rows", [1, 3, 7, 32, 50])
def test_products_equal_exact_integer_arithmetic(k: int, n: int, rows: int) -> None:
    """Odd sizes exercise every padding path (rows past a multiple of 4, outputs past a strip of 16, reductions
    past a group of 4); n = 2100 spans several passes of x·Wᵀ (UP_GROUPS groups of 4 each)."""
    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    w = torch.randn(k, n, generator=gen)
    packed = avx2_int8.PackedInt8Avx2(w)
    assert packed.scale == pytest.approx(float(w.abs().max()) / 127, rel=1e-6)
    wq = _codes(w, packed.scale)
    x, h = torch.randn(rows, n, generator=gen), torch.randn(rows, k, generator=gen)
    x[0] = 0.0  # a row of zeros: factor 1, all-zero codes

    qx, rx = _quantize_rows(x)
    want_up = (qx.to(torch.int64) @ wq.t()).float().mul_(rx * packed.scale)  # int32-exact sums, then fp32 scaling
    assert torch.equal(packed.up(x), want_up)

    qh, rh = _quantize_rows(h)
    sums = (qh.to(torch.int64) @ wq).float() * packed.scale
    got, r = packed.down_row_scaled(h)
    assert torch.equal(r, rh) and torch.equal(got, sums.to(torch.bfloat16))  # fp32 scaling, then bf16
    got, r = packed.down_row_scaled(h, torch.float32)
    assert torch.equal(r, rh) and torch.equal(got, sums)


@needs_avx2
def test_codes_of_127_everywhere_saturate_nothing() -> None:
    """vpmaddubsw adds two products into 16 bits: 2 · 127 · 127 = 32,258 must not saturate, for any sign."""
    k, n = 16, 4096
    w = torch.ones(k, n)
    w[::2] = -1.0
    packed = avx2_int8.PackedInt8Avx2(w)
    x = torch.ones(3, n)
    x[1] = -1.0
    _, rx = _quantize_rows(x)
    sums = torch.tensor([-1.0, 1.0] * (k // 2)) * (127 * 127 * n)  # 66,064,384: exact in int32 and in fp32
    assert torch.equal(packed.up(x), torch.stack([sums, -sums, sums]).mul_(rx * packed.scale))
    h = torch.ones(2, k)
    h[1, ::3] = -1.0
    qh, _ = _quantize_rows(h)
    assert qh.abs().min() == 127
    got, _ = packed.down_row_scaled(h, torch.float32)
    assert torch.equal(got, (qh.to(torch.int64) @ _codes(w, packed.scale)).float() * packed.scale)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_quantiser_matches_torch_and_pads_with_zeros(dtype: torch.dtype) -> None:
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[2] = 0.0
    q, r = avx2_int8.quantize_rows(x[:, 3:], rows=8, width=80)  # a strided view: rows not contiguous in memory
    want_q, want_r = _quantize_rows(x[:, 3:])
    assert torch.equal(q[:5, :67], want_q) and torch.equal(r, want_r)
    assert not q[5:].any() and not q[:, 67:].any()
    with pytest.raises(ValueError, match="cannot hold"):
        avx2_int8.quantize_rows(x, rows=4, width=70)


@needs_avx2
def test_packed_buffers_are_refilled_not_reallocated() -> None:
    w = torch.randn(40, 130)
    first = avx2_int8.PackedInt8Avx2(w)
    second = avx2_int8.PackedInt8Avx2(w * 2, previous=first)
    assert second.up_layout.data_ptr() == first.up_layout.data_ptr()
    assert second.down_layout.data_ptr() == first.down_layout.data_ptr()
    assert second.scale == pytest.approx(2 * first.scale)
    x = torch.randn(3, 130)
    assert torch.allclose(second.up(x), 2 * avx2_int8.PackedInt8Avx2(w).up(x), rtol=1e-5, atol=1e-5)


@needs_avx2
def test_bad_inputs_are_refused_with_the_reason() -> None:
    w = torch.randn(40, 130)
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        avx2_int8.PackedInt8Avx2(w)
    packed = avx2_int8.PackedInt8Avx2(torch.randn(40, 130))
    with pytest.raises(ValueError, match=r"\(rows, 130\)"):
        packed.up(torch.randn(3, 129))
    with pytest.raises(ValueError, match=r"\(rows, 40\)"):
        packed.down_row_scaled(torch.randn(3, 41))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        packed.down_row_scaled(torch.randn(3, 40), torch.float16)
    with pytest.raises(ValueError, match="floating-point"):
        avx2_int8.quantize_rows(torch.ones(3, 4, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="2-D CPU matrix"):
        avx2_int8.PackedInt8Avx2(torch.randn(4))


@needs_avx2
def test_int8_weight_runs_them_and_names_them(avx2_kernels) -> None:
    assert int8_kernel() == "avx2" and int8_kernel_name().startswith("avx2 (analog_ep/fast/native/int8_avx2.c")
    gen = torch.Generator().manual_seed(5)
    w, x, h = torch.randn(48, 640, generator=gen), torch.randn(9, 640, generator=gen), torch.randn(9, 48, generator=gen)
    weight = Int8Weight(w, down_dtype=torch.float32)
    assert weight.kernel == "avx2"
    down, r, up = weight.down_up(h, x)
    assert down.dtype == torch.float32 and torch.equal(up, weight.packed.up(x))
    assert torch.equal(weight.down(h), down * r)
    again = Int8Weight(w * 3, previous=weight)
    assert again.packed.up_layout.data_ptr() == weight.packed.up_layout.data_ptr()  # refilled in place


@needs_avx2
@pytest.mark.skipif(not int8_available(), reason="no int8 kernels here")
def test_avx2_and_onednn_kernels_give_the_same_numbers(monkeypatch: pytest.MonkeyPatch, avx2_kernels) -> None:
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(48, 640, generator=gen), torch.randn(32, 640, generator=gen)
    h = torch.randn(32, 48, generator=gen)
    ours = Int8Weight(w)
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "onednn")
    theirs = Int8Weight(w)
    assert (ours.kernel, theirs.kernel) == ("avx2", "onednn")
    assert all(torch.equal(a, b) for a, b in zip(ours.down_up(h, x), theirs.down_up(h, x)))
    # fp32 results: ours exact (above); oneDNN's are its bf16 ones widened (its fp32 output is not exact on AVX2)
    theirs = Int8Weight(w, down_dtype=torch.float32)
    down, r, up = theirs.down_up(h, x)
    assert down.dtype == torch.float32 and torch.equal(down, ours.down_up(h, x)[0].float())


@needs_avx2
@pytest.mark.parametrize("schedule", ["alternating", "synchronous"])
def test_training_steps_are_bit_identical_under_avx2_and_onednn(monkeypatch: pytest.MonkeyPatch,
                                                                schedule: str) -> None:
    from analog_ep.estimators import EPConfig, ep_symmetric
    from analog_ep.fast import precision
    from tests.helpers import random_inputs, small_net

    # bf16 beside the int8 products on any CPU: what both kernel sets write exactly (oneDNN's fp32 h·W is not)
    monkeypatch.setattr(precision, "lowp_dtype", lambda device="cpu": torch.bfloat16)

    def trained(kernel: str) -> list[torch.Tensor]:
        monkeypatch.setenv("SEQEP_INT8_KERNEL", kernel)
        net = small_net("imdb", schedule=schedule)
        x, y = random_inputs(net.spec, 8, dtype=torch.float32)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            ep_symmetric(net, x, y, EPConfig(0.1, 20, 8, precision="int8"))
            optimizer.step()
        assert net.low_precision_weights("int8")[0].kernel == kernel
        assert not torch.equal(net.weights[0], small_net("imdb").weights[0])  # the steps did train
        return [p.detach().clone() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(trained("avx2"), trained("onednn")))


@needs_avx2
def test_without_bf16_instructions_int8_keeps_its_other_operands_in_fp32_and_tracks_the_exact_update(
        monkeypatch: pytest.MonkeyPatch, avx2_kernels) -> None:
    """On a CPU without bf16 dot products torch would emulate the retrieval's bf16 products: the int8 mode takes
    them in fp32 there, and its update stays within the fidelity bound (2°) of the exact path's."""
    from analog_ep.estimators import EPConfig, ep_symmetric
    from analog_ep.fast import precision
    from tests.helpers import random_inputs, small_net

    monkeypatch.setattr(precision, "lowp_dtype", lambda device="cpu": torch.float32)
    net = small_net("imdb")
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    assert net.prepare(x, precision="int8").lowp.dtype == torch.float32
    assert net.low_precision_weights("int8")[0].down_dtype == torch.float32

    def update(mode: str) -> torch.Tensor:
        net.zero_grad()
        ep_symmetric(net, x, y, EPConfig(0.1, 30, 10, precision=mode))
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    exact, fast = update("fp32"), update("int8")
    angle = torch.rad2deg(torch.arccos(torch.nn.functional.cosine_similarity(exact, fast, dim=0).clamp(-1, 1)))
    assert angle < 2.0
