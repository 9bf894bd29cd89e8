"""Our own int8 AMX kernels for the large synapse's two products (source: `native/int8_amx.c`, built and
loaded by `native_kernels`).

Where they cannot load, `available()` is False with the reason in `unavailable_reason()`, and
`lowp_weights` falls back to our AVX2 kernels (`avx2_int8`) or oneDNN's (the same numbers, bit for bit:
tests/fast/test_amx_int8.py).
`SEQEP_INT8_KERNEL=onednn` forces that fallback (`SEQEP_INT8_KERNEL=avx2`: our AVX2 kernels, `avx2_int8`).

The wrappers check shapes, dtypes and contiguity and say what was wrong: the C side trusts its inputs.
"""

from __future__ import annotations

import ctypes
import math
import os

import torch

from analog_ep.fast import native_kernels
from analog_ep.fast.kernel_args import loaded, rows_to_quantise

ALIGN = 64  # rows and columns are padded to this (AMX tiles are 16 rows x 64 bytes; kernels pair them)
ROW_BLOCK = 32  # the kernels take rows in blocks of 32 (two tiles)
SMALL_MATRIX = 32 << 20  # int8 bytes of W below which the one-pass kernel may read it more than once per step
ACC_BYTES = 256 << 10  # per-thread int32 partial sums of x·Wᵀ one call of the one-pass kernel keeps (in L2)
LONG_CHUNK_ROWS = 512  # rows from which the one-pass kernel takes 1,024 columns per pass (`fused_chunk`)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def fused_chunk(rows: int) -> int:
    """Columns of W per pass of the one-pass kernel: its up layout of them (chunk x Kp bytes) and the staged
    codes (rows x chunk) stay in L2; with many rows, longer chunks halve the reloads of the rows' partial sums
    (SNLI's nudged 512 rows: 10.4-11.7 -> 9.5 ms, isolated; at 32-256 rows no better or slower)."""
    return 1024 if rows >= LONG_CHUNK_ROWS else 512


def fused_rows(rows: int, Kp: int, Np: int) -> int:
    """Rows per call of the one-pass kernel. Each call keeps a thread's int32 partial sums of x·Wᵀ (rows x Kp)
    in L2 beside its staged codes and up layout; past ~256 KB of them they spill (SNLI's nudged 512 rows:
    917 KB). Where W is small enough to read again cheaply (SNLI's 12 MB), the rows are split to keep them in
    L2: SNLI nudged step 17.2 -> 15.1 ms (median of 8 interleaved rounds). At IMDB (180 MB) re-reading W
    costs more than the spill (b128 nudged 93 -> 104 ms split): one call."""
    if Kp * Np > SMALL_MATRIX:
        return rows
    return max(ROW_BLOCK, min(rows, ACC_BYTES // (4 * Kp) // ROW_BLOCK * ROW_BLOCK))


def _switched_off() -> bool:
    return os.environ.get("SEQEP_INT8_KERNEL", "").lower() in ("onednn", "avx2")


def library() -> ctypes.CDLL | None:
    """The native kernels for int8, or None: not loadable here, or `SEQEP_INT8_KERNEL=onednn|avx2` (read per call)."""
    return None if _switched_off() else native_kernels.library()


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    if _switched_off():
        return f"SEQEP_INT8_KERNEL={os.environ['SEQEP_INT8_KERNEL'].lower()}"
    return native_kernels.unavailable_reason()


def _loaded() -> ctypes.CDLL:
    return loaded(library(), "AMX int8 kernels", unavailable_reason())


def quantize_rows(x: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) as int8 per row (`lowp_weights._quantize_rows`' rule: r = max|row| / 127, q =
    round(x / r)), into a zero-padded (rows, width) buffer; returns (q, r (M, 1) fp32)."""
    return _quantize_rows_with(_loaded(), x, rows, width)


def _quantize_rows_with(lib: ctypes.CDLL, x: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, q, r = rows_to_quantise(x, rows, width, "amx_int8", (torch.float32, torch.bfloat16))
    m, n = x.shape
    lib.seqep_quantize_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), m, n, x.stride(0), q.data_ptr(), rows,
                            width, r.data_ptr(), torch.get_num_threads())
    return q, r


class PackedInt8:
    """W (K x N, fp32) quantised symmetrically (one scale) into the AMX layout of the h·W product; the x·Wᵀ
    layout is derived from it on first use of `up` alone (`down_up` needs none: it transposes in cache).
    Buffers are reused across batches when `previous` has the same shape (a fresh 180 MB matrix would be paged
    in every batch). Activations are quantised per row inside the products. Keeps the library it was built
    with: switching the kernels off later (`SEQEP_INT8_KERNEL=onednn`) does not break a packed matrix in use."""

    def __init__(self, weight: torch.Tensor, previous: PackedInt8 | None = None) -> None:
        self._lib = lib = _loaded()
        w = weight.detach().to(torch.float32).contiguous()
        if w.dim() != 2 or w.device.type != "cpu":
            raise ValueError(f"amx_int8: the weight must be a 2-D CPU matrix, got shape {tuple(w.shape)} on {w.device}")
        self.K, self.N = w.shape
        self.Kp, self.Np = _round_up(self.K, ALIGN), _round_up(self.N, ALIGN)
        size = self.Kp * self.Np
        reuse = previous is not None and (previous.Kp, previous.Np) == (self.Kp, self.Np)
        self.down_layout = previous.down_layout if reuse else torch.empty(size, dtype=torch.int8)
        self._up_buffer = previous._up_buffer if reuse else None
        self._up_ready = False
        self._scratch: dict[str, torch.Tensor] = previous._scratch if reuse else {}
        threads = torch.get_num_threads()
        amax = float(lib.seqep_absmax(w.data_ptr(), w.numel(), threads))
        if not math.isfinite(amax):
            raise ValueError("amx_int8: the weight holds NaN or inf entries; the run diverged (lower the learning "
                             "rate or beta, or resume from the last checkpoint)")
        self.scale = amax / 127.0 or 1.0
        lib.seqep_pack_int8(w.data_ptr(), self.K, self.N, self.scale, self.down_layout.data_ptr(), None, self.Kp,
                            self.Np, threads)

    @property
    def up_layout(self) -> torch.Tensor:
        """The x·Wᵀ layout, transposed from the down layout on first use (one pass at memory speed)."""
        if not self._up_ready:
            if self._up_buffer is None:
                self._up_buffer = torch.empty(self.Kp * self.Np, dtype=torch.int8)
            self._lib.seqep_down_to_up(self.down_layout.data_ptr(), self.Kp, self.Np, self._up_buffer.data_ptr(),
                                       torch.get_num_threads())
            self._up_ready = True
        return self._up_buffer

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        t = self._scratch.get(name)
        if t is None or t.numel() < numel or t.dtype != dtype:
            t = self._scratch[name] = torch.empty(numel, dtype=dtype)
        return t

    def _check(self, t: torch.Tensor, width: int, name: str) -> None:
        if t.dim() != 2 or t.shape[1] != width:
            raise ValueError(f"amx_int8: {name} must be (rows, {width}), got {tuple(t.shape)}")

    def down_row_scaled(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (M x K) · W as (q·W·scale in bf16, r): h ≈ q · r per row, r (M, 1) left to the caller."""
        self._check(h, self.K, "h")
        M = h.shape[0]
        q, r = _quantize_rows_with(self._lib, h, _round_up(M, ROW_BLOCK), self.Kp)
        out = torch.empty(M, self.N, dtype=torch.bfloat16)
        self._lib.seqep_down_int8(q.data_ptr(), self.down_layout.data_ptr(), M, q.shape[0], self.Kp, self.N,
                                  self.Np, self.scale, out.data_ptr(), torch.get_num_threads())
        return out, r

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """x (M x N) · Wᵀ as fp32 (M x K), x quantised per row."""
        self._check(x, self.N, "x")
        M = x.shape[0]
        Mp = _round_up(M, ROW_BLOCK)
        q, r = _quantize_rows_with(self._lib, x, Mp, self.N)
        out = torch.empty(M, self.K, dtype=torch.float32)
        acc = self._buffer("acc", Mp * self.Kp, torch.int32)
        self._lib.seqep_up_int8(q.data_ptr(), r.data_ptr(), self.up_layout.data_ptr(), M, Mp, self.N, self.Np,
                                self.K, self.Kp, self.scale, out.data_ptr(), acc.data_ptr(), torch.get_num_threads())
        return out

    def down_up(self, h: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`down_row_scaled(h)` and `up(x)` in one read of W (same numbers, bit for bit): what a synchronous
        step needs, at about half the memory traffic where the rows are few. `x_absmax` (M,): max |x| per row,
        where the producer of a bf16 x already knows it (`retrieval`): x is then quantised inside the
        kernel instead of by a separate pass over it."""
        self._check(h, self.K, "h")
        self._check(x, self.N, "x")
        if h.shape[0] != x.shape[0]:
            raise ValueError(f"amx_int8: h and x must have the same rows, got {h.shape[0]} and {x.shape[0]}")
        M = h.shape[0]
        Mp = _round_up(M, ROW_BLOCK)
        threads = torch.get_num_threads()
        step = fused_rows(Mp, self.Kp, self.Np)
        chunk = fused_chunk(step)
        qh, rh = _quantize_rows_with(self._lib, h, Mp, self.Kp)
        in_kernel = x_absmax is not None and x.dtype == torch.bfloat16 and x.is_contiguous()
        if in_kernel:
            amax = x_absmax.to(torch.float32).reshape(M, 1)
            rx = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # `quantize_rows`' factors
            qx, stage = None, self._buffer("stage", threads * step * chunk, torch.int8)
        else:
            (qx, rx), stage = _quantize_rows_with(self._lib, x, Mp, self.Np), None
        down = torch.empty(M, self.N, dtype=torch.bfloat16)
        up = torch.empty(M, self.K, dtype=torch.float32)
        acc = self._buffer("acc", threads * step * self.Kp, torch.int32)
        scratch = self._buffer("scratch", threads * chunk * self.Kp, torch.int8)
        for m0 in range(0, M, step):
            rows = min(step, M - m0)
            self._lib.seqep_down_up_int8(
                qh[m0:].data_ptr(), None if qx is None else qx[m0:].data_ptr(),
                x[m0:].data_ptr() if in_kernel else None, rx[m0:].data_ptr(), self.down_layout.data_ptr(),
                rows, _round_up(rows, ROW_BLOCK), self.K, self.Kp, self.N, self.Np, self.scale, down[m0:].data_ptr(),
                up[m0:].data_ptr(), acc.data_ptr(), scratch.data_ptr(), None if stage is None else stage.data_ptr(),
                chunk, threads)
        return down, rh, up
