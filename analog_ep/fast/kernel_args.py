"""What the ctypes wrappers of our int8 kernels (`amx_int8`, `avx2_int8`) share: the library or the reason it is
missing, and argument checks (the C side trusts its inputs, so the wrappers refuse what it cannot read and say
what was wrong)."""

from __future__ import annotations

import ctypes

import torch


def loaded(lib: ctypes.CDLL | None, what: str, reason: str) -> ctypes.CDLL:
    """`lib`, or a RuntimeError that says why `what` cannot run here."""
    if lib is None:
        raise RuntimeError(f"{what} unavailable: {reason}")
    return lib


def rows_to_quantise(x: torch.Tensor, rows: int, width: int, owner: str, dtypes: tuple[torch.dtype, ...]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, N) as the kernel reads it (a dtype of `dtypes`, else fp32; unit stride along rows), and the buffers its
    row quantiser fills: q (rows, width) int8, zero-padded, and r (M, 1) fp32."""
    if x.dim() != 2 or not x.is_floating_point() or x.device.type != "cpu":
        raise ValueError(f"{owner}: rows to quantise must be a 2-D floating-point CPU tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if x.dtype not in dtypes:  # e.g. float64 (the GDU check): as lowp_weights._quantize_rows does
        x = x.to(torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, n = x.shape
    if rows < m or width < n:
        raise ValueError(f"{owner}: a ({rows}, {width}) buffer cannot hold ({m}, {n}) rows")
    return x, torch.empty(rows, width, dtype=torch.int8), torch.empty(m, 1, dtype=torch.float32)
