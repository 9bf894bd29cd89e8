"""Our int8 kernels for CPUs with AVX2 but no AMX (source: `native/int8_avx2.c`, in the `AVX2` kernel set of
`native_kernels`).

The same quantisation as the AMX kernels and oneDNN's (W: one scale, max|W| / 127; activations per row), so the
same integer sums and the same results (tests/fast/test_avx2_int8.py checks them against `torch._int_mm` on the
same codes). On an AVX2-only CPU oneDNN's int8 products take hundreds of times as long as fp32; these run at
about twice the fp32 rate (docs/benchmarks.md).

The wrappers check shapes, dtypes and devices and say what was wrong: the C side trusts its inputs.
"""

from __future__ import annotations

import ctypes
import math

import torch

from analog_ep.fast import native_kernels
from analog_ep.fast.kernel_args import loaded, rows_to_quantise

STRIP = 16  # output columns per strip of a layout (the kernel's two ymm of int32)
ROWS = 4  # rows per micro-kernel call: activation buffers are padded to a multiple of this


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def library() -> ctypes.CDLL | None:
    """The AVX2 kernel set, or None (reason in `unavailable_reason()`)."""
    return native_kernels.library(native_kernels.AVX2)


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    return native_kernels.unavailable_reason(native_kernels.AVX2)


def _loaded() -> ctypes.CDLL:
    return loaded(library(), "AVX2 int8 kernels", unavailable_reason())


def quantize_rows(x: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) as int8 per row (`lowp_weights._quantize_rows`' rule) into a zero-padded (rows, width) buffer;
    returns (q, r (M, 1) fp32)."""
    x, q, r = rows_to_quantise(x, rows, width, "avx2_int8", (torch.float32,))
    m, n = x.shape
    _loaded().seqep_quantize_rows_avx2(x.data_ptr(), m, n, x.stride(0), q.data_ptr(), rows, width, r.data_ptr(),
                                       torch.get_num_threads())
    return q, r


class PackedInt8Avx2:
    """W (K x N) quantised symmetrically (one scale) into the two layouts the AVX2 kernels read (`native/
    int8_avx2.c`), 2 bytes per weight in all. Buffers are reused across batches when `previous` has the same
    shape (a fresh 180 MB matrix would be paged in every batch)."""

    def __init__(self, weight: torch.Tensor, previous: PackedInt8Avx2 | None = None) -> None:
        self._lib = lib = _loaded()
        w = weight.detach()
        if w.dim() != 2 or w.device.type != "cpu":
            raise ValueError(f"avx2_int8: the weight must be a 2-D CPU matrix, got shape {tuple(w.shape)} on "
                             f"{w.device}")
        w = w.to(torch.float32).contiguous()
        self.K, self.N = w.shape
        self.Kp, self.Np = _round_up(self.K, STRIP), _round_up(self.N, STRIP)
        threads = torch.get_num_threads()
        amax = float(lib.seqep_absmax_avx2(w.data_ptr(), w.numel(), threads))
        if not math.isfinite(amax):
            raise ValueError("avx2_int8: the weight holds NaN or inf entries; the run diverged (lower the learning "
                             "rate or beta, or resume from the last checkpoint)")
        self.scale = amax / 127.0 or 1.0
        size = self.Kp * self.Np
        reuse = previous is not None and (previous.Kp, previous.Np) == (self.Kp, self.Np)
        self.up_layout = previous.up_layout if reuse else torch.empty(size, dtype=torch.int8)
        self.down_layout = previous.down_layout if reuse else torch.empty(size, dtype=torch.int8)
        lib.seqep_pack_int8_avx2(w.data_ptr(), self.K, self.N, self.scale, self.up_layout.data_ptr(),
                                 self.down_layout.data_ptr(), self.Kp, self.Np, threads)

    def _check(self, t: torch.Tensor, width: int, name: str) -> None:
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"avx2_int8: {name} must be (rows, {width}), got {tuple(t.shape)}")

    def down_row_scaled(self, h: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (M x K) · W as (q·W·scale in `dtype`, r): h ≈ q · r per row, r (M, 1) left to the caller."""
        self._check(h, self.K, "h")
        if dtype not in (torch.bfloat16, torch.float32):
            raise ValueError(f"avx2_int8: the h·W result is bf16 or fp32, not {dtype}")
        M = h.shape[0]
        q, r = quantize_rows(h, _round_up(M, ROWS), self.Kp)
        out = torch.empty(M, self.N, dtype=dtype)
        self._lib.seqep_down_int8_avx2(q.data_ptr(), self.down_layout.data_ptr(), M, q.shape[0], self.Kp, self.N,
                                       self.Np, self.scale, out.data_ptr(), int(dtype == torch.bfloat16),
                                       torch.get_num_threads())
        return out, r

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """x (M x N) · Wᵀ as fp32 (M x K), x quantised per row."""
        self._check(x, self.N, "x")
        M = x.shape[0]
        q, r = quantize_rows(x, _round_up(M, ROWS), self.Np)
        out = torch.empty(M, self.K, dtype=torch.float32)
        self._lib.seqep_up_int8_avx2(q.data_ptr(), r.data_ptr(), self.up_layout.data_ptr(), M, q.shape[0], self.Np,
                                     self.K, self.Kp, self.scale, out.data_ptr(), torch.get_num_threads())
        return out
