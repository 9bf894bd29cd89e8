"""What every int8 kernel set must do alike (ours on AMX and on AVX2, oneDNN's): quantise rows as torch does,
refill packed buffers in place, refuse bad inputs with the reason, and keep the largest sums exact. Each set's
own products are tested against exact integer arithmetic in its own file (test_amx_int8.py, test_avx2_int8.py,
test_native_sources.py)."""

from __future__ import annotations

import pytest
import torch

from analog_ep.fast import amx_int8, avx2_int8
from analog_ep.fast.lowp_weights import Int8Weight, _quantize_rows, int8_kernel

needs_amx = pytest.mark.skipif(not amx_int8.available(), reason=f"AMX kernels: {amx_int8.unavailable_reason()}")
needs_avx2 = pytest.mark.skipif(not avx2_int8.available(), reason=f"AVX2 kernels: {avx2_int8.unavailable_reason()}")
OURS = [pytest.param(amx_int8.quantize_rows, amx_int8.PackedInt8, id="amx", marks=needs_amx),
        pytest.param(avx2_int8.quantize_rows, avx2_int8.PackedInt8Avx2, id="avx2", marks=needs_avx2)]


@pytest.mark.parametrize("quantize_rows, packer", OURS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_quantiser_matches_torch_and_pads_with_zeros(quantize_rows, packer, dtype: torch.dtype) -> None:
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1)).to(dtype)
    x[2] = 0.0
    q, r = quantize_rows(x[:, 3:], rows=32, width=80)  # a strided view: rows not contiguous in memory
    want_q, want_r = _quantize_rows(x[:, 3:])
    assert torch.equal(q[:5, :67], want_q) and torch.equal(r, want_r)
    assert not q[5:].any() and not q[:, 67:].any()
    with pytest.raises(ValueError, match="cannot hold"):
        quantize_rows(x, rows=4, width=70)


@pytest.mark.parametrize("quantize_rows, packer", OURS)
def test_packed_buffers_are_refilled_not_reallocated(quantize_rows, packer) -> None:
    w = torch.randn(40, 130)
    first = packer(w)
    second = packer(w * 2, previous=first)
    assert second.down_layout.data_ptr() == first.down_layout.data_ptr()
    assert second.scale == pytest.approx(2 * first.scale)
    x = torch.randn(3, 130)
    assert torch.allclose(second.up(x), 2 * packer(w).up(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantize_rows, packer", OURS)
def test_bad_inputs_are_refused_with_the_reason(quantize_rows, packer) -> None:
    w = torch.randn(40, 130)
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        packer(w)
    packed = packer(torch.randn(40, 130))
    with pytest.raises(ValueError, match=r"\(rows, 130\)"):
        packed.up(torch.randn(3, 129))
    with pytest.raises(ValueError, match=r"\(rows, 40\)"):
        packed.down_row_scaled(torch.randn(3, 41))
    with pytest.raises(ValueError, match="floating-point"):
        quantize_rows(torch.ones(3, 4, dtype=torch.int32), 32, 64)


@pytest.mark.parametrize("kernel", [pytest.param("amx", marks=needs_amx), pytest.param("avx2", marks=needs_avx2),
                                    "onednn"])
def test_codes_of_127_everywhere_keep_the_largest_sums_exact(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """The largest int32 sums a row can reach (127² · n) stay exact; on AVX2 each 16-bit pair sum of `vpmaddubsw`
    (2 · 127², for either sign) must not saturate."""
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "" if kernel == "amx" else kernel)
    if int8_kernel() != kernel:
        pytest.skip(f"the {kernel} int8 kernels do not run here")
    k, n = 16, 4096
    w = torch.ones(k, n)
    w[::2] = -1.0
    weight = Int8Weight(w)
    x = torch.ones(3, n)
    x[1] = -1.0
    _, rx = _quantize_rows(x)
    sums = torch.tensor([-1.0, 1.0] * (k // 2)) * (127 * 127 * n)  # 66,064,384: exact in int32 and in fp32
    assert torch.equal(weight.up(x), torch.stack([sums, -sums, sums]).mul_(rx * weight.scale))
    h = torch.ones(2, k)
    h[1, ::3] = -1.0
    qh, _ = _quantize_rows(h)
    got, _ = weight.down_row_scaled(h)
    codes = torch.where(w > 0, 127, -127).to(torch.int64)
    assert torch.equal(got, ((qh.to(torch.int64) @ codes).float() * weight.scale).to(torch.bfloat16))


@pytest.mark.parametrize("kernel", [pytest.param("amx", marks=needs_amx), pytest.param("avx2", marks=needs_avx2)])
@pytest.mark.parametrize("schedule", ["alternating", "synchronous"])  # synchronous: AMX takes both in one pass
def test_training_steps_are_bit_identical_under_ours_and_onednn(monkeypatch: pytest.MonkeyPatch, kernel: str,
                                                                schedule: str) -> None:
    """So runs trained with the oneDNN kernels (int8 results in docs/history.md) are what ours would produce."""
    from analog_ep.estimators import EPConfig, ep_symmetric
    from analog_ep.fast import lowp_phi, lowp_weights
    from tests.helpers import random_inputs, small_net

    # bf16 beside the int8 products on any CPU: what every kernel set writes exactly (oneDNN's fp32 h·W is not)
    monkeypatch.setattr(lowp_weights, "lowp_dtype", lambda device="cpu": torch.bfloat16)
    # the dense products (the change products keep row scales across steps: tests/fast/test_delta_int8.py)
    monkeypatch.setattr(lowp_phi, "FOLLOW_CHANGES", False)

    def trained(env: str, expected: str) -> list[torch.Tensor]:
        monkeypatch.setenv("SEQEP_INT8_KERNEL", env)
        net = small_net("imdb", schedule=schedule)
        x, y = random_inputs(net.spec, 8, dtype=torch.float32)
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            ep_symmetric(net, x, y, EPConfig(0.1, 20, 8, precision="int8"))
            optimizer.step()
        assert net.low_precision_weights("int8")[0].kernel == expected
        assert not torch.equal(net.weights[0], small_net("imdb").weights[0])  # the steps did train
        return [p.detach().clone() for p in net.parameters()]

    ours = trained("" if kernel == "amx" else kernel, kernel)
    assert all(torch.equal(a, b) for a, b in zip(ours, trained("onednn", "onednn")))
