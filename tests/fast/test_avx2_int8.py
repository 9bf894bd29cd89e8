"""Our AVX2 int8 kernels (analog_ep/fast/native/int8_avx2.c) against exact integer arithmetic and against the other
int8 kernel set that runs on the same machine (oneDNN's)."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import avx2_int8
from analog_ep.fast.lowp_weights import Int8Weight, int8_available, int8_kernel, int8_kernel_name
from tests.helpers import int8_exact_case

needs_avx2 = pytest.mark.skipif(not avx2_int8.available(), reason=f"AVX2 kernels: {avx2_int8.unavailable_reason()}")


@pytest.fixture
def avx2_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our AVX2 kernels even on an AMX machine (`SEQEP_INT8_KERNEL=avx2`)."""
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "avx2")


@needs_avx2
@pytest.mark.parametrize("k, n", [(37, 203), (64, 64), (100, 1000), (40, 130), (16, 2100)])
@pytest.mark.parametrize("rows", [1, 3, 7, 32, 50])
def test_products_equal_exact_integer_arithmetic(k: int, n: int, rows: int) -> None:
    """Odd sizes exercise every padding path (rows past a multiple of 4, outputs past a strip of 16, reductions
    past a group of 4); n = 2100 spans several passes of x·Wᵀ (UP_GROUPS groups of 4 each)."""
    case = int8_exact_case(avx2_int8.PackedInt8Avx2, k, n, rows)
    packed, x, h, rh, sums = case["packed"], case["x"], case["h"], case["rh"], case["down_sums"]
    assert torch.equal(packed.up(x), case["up"])
    got, r = packed.down_row_scaled(h)
    assert torch.equal(r, rh) and torch.equal(got, sums.to(torch.bfloat16))  # fp32 scaling, then bf16
    got, r = packed.down_row_scaled(h, torch.float32)
    assert torch.equal(r, rh) and torch.equal(got, sums)


@needs_avx2
def test_bad_inputs_of_their_own_are_refused_with_the_reason() -> None:
    """(The checks every int8 kernel set shares: tests/fast/test_int8_kernel_sets.py.)"""
    packed = avx2_int8.PackedInt8Avx2(torch.randn(40, 130))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        packed.down_row_scaled(torch.randn(3, 40), torch.float16)
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
def test_without_bf16_instructions_int8_keeps_its_other_operands_in_fp32_and_tracks_the_exact_update(
        monkeypatch: pytest.MonkeyPatch, avx2_kernels) -> None:
    """On a CPU without bf16 dot products torch would emulate the retrieval's bf16 products: the int8 mode takes
    them in fp32 there, and its update stays within the fidelity bound (2°) of the exact path's."""
    from analog_ep.estimators import EPConfig, ep_symmetric
    from analog_ep.fast import lowp_weights
    from tests.helpers import random_inputs, small_net

    monkeypatch.setattr(lowp_weights, "lowp_dtype", lambda device="cpu": torch.float32)
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
