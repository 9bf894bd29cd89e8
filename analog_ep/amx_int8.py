"""Our own int8 AMX kernels for the large synapse's two products (source: `native/int8_amx.c`).

Built with the system C compiler on first use into a cache folder (a few hundred ms, once per source
version), loaded through ctypes; no torch headers, so the build does not depend on the torch version.
Where the CPU has no AMX, no compiler is found, or the build fails, `available()` is False with the
reason in `unavailable_reason()`, and `lowp_weights` falls back to oneDNN's int8 kernels (same numbers).
`SEQEP_INT8_KERNEL=onednn` forces that fallback.

The wrappers check shapes, dtypes and contiguity and say what was wrong: the C side trusts its inputs.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "native" / "int8_amx.c"
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mamx-tile", "-mamx-int8"]
CPU_FLAGS = ("amx_tile", "amx_int8", "avx512bw", "avx512vl", "avx512_bf16")
ALIGN = 64  # rows and columns are padded to this (AMX tiles are 16 rows x 64 bytes; kernels pair them)
ROW_BLOCK = 32  # the kernels take rows in blocks of 32 (two tiles)

_state: dict[str, object] = {}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def cache_dir() -> Path:
    base = os.environ.get("SEQEP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqep")
    return Path(base) / "native"


def _cpu_missing() -> list[str]:
    if not sys.platform.startswith("linux"):
        return ["Linux (AMX needs its arch_prctl permission call)"]
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ["/proc/cpuinfo"]
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [f for f in CPU_FLAGS if f not in flags]


def _build() -> Path:
    """Compile the kernels once per (source, flags, compiler); atomic, so concurrent builds cannot clash."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode()).hexdigest()[:16]
    target = cache_dir() / f"int8_amx-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}: {done.stderr.strip()[-400:]}")
        os.replace(built, target)
    return target


def _load() -> ctypes.CDLL:
    missing = _cpu_missing()
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(missing)}")
    lib = ctypes.CDLL(str(_build()))
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.seqep_amx_init.restype = i32
    lib.seqep_absmax.argtypes, lib.seqep_absmax.restype = [p, i64, i32], f32
    lib.seqep_pack_int8.argtypes = [p, i64, i64, f32, p, p, i64, i64, i32]
    lib.seqep_down_int8.argtypes = [p, p, i64, i64, i64, i64, i64, f32, p, i32]
    lib.seqep_up_int8.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, f32, p, p, i32]
    lib.seqep_quantize_rows.argtypes = [p, i32, i64, i64, i64, p, i64, i64, p, i32]
    if lib.seqep_amx_init() != 0:
        raise RuntimeError("the kernel refused this process AMX state (arch_prctl ARCH_REQ_XCOMP_PERM failed)")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (reason in `unavailable_reason()`); tried once per process."""
    if "lib" not in _state:
        if os.environ.get("SEQEP_INT8_KERNEL", "").lower() == "onednn":
            _state["lib"], _state["why"] = None, "SEQEP_INT8_KERNEL=onednn"
        else:
            try:
                _state["lib"], _state["why"] = _load(), ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"], _state["why"] = None, str(exc)
    return _state["lib"]  # type: ignore[return-value]


def forget() -> None:
    """Forget the load attempt, so that the next use tries again (after changing SEQEP_INT8_KERNEL or CC)."""
    _state.clear()


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    library()
    return str(_state["why"])


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"AMX int8 kernels unavailable: {unavailable_reason()}")
    return lib


def quantize_rows(x: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, N) as int8 per row (`lowp_weights._quantize_rows`' rule: r = max|row| / 127, q =
    round(x / r)), into a zero-padded (rows, width) buffer; returns (q, r (M, 1) fp32)."""
    return _quantize_rows_with(_loaded(), x, rows, width)


def _quantize_rows_with(lib: ctypes.CDLL, x: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() != 2 or not x.is_floating_point() or x.device.type != "cpu":
        raise ValueError(f"amx_int8: rows to quantise must be a 2-D floating-point CPU tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    if x.dtype not in (torch.float32, torch.bfloat16):  # e.g. float64 (the GDU check): as _quantize_rows does
        x = x.to(torch.float32)
    if x.stride(1) != 1:
        x = x.contiguous()
    m, n = x.shape
    if rows < m or width < n:
        raise ValueError(f"amx_int8: a ({rows}, {width}) buffer cannot hold ({m}, {n}) rows")
    q = torch.empty(rows, width, dtype=torch.int8)
    r = torch.empty(m, 1, dtype=torch.float32)
    lib.seqep_quantize_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), m, n, x.stride(0), q.data_ptr(), rows,
                            width, r.data_ptr(), torch.get_num_threads())
    return q, r


class PackedInt8:
    """W (K x N, fp32) quantised symmetrically (one scale) into the two AMX layouts; buffers reused across
    batches when `previous` has the same shape (a fresh 360 MB pair would be paged in every batch).
    Activations are quantised per row inside `up` / `down_row_scaled`. Keeps the library it was built
    with: switching the kernels off later (`forget`) does not break a packed matrix in use."""

    def __init__(self, weight: torch.Tensor, previous: PackedInt8 | None = None) -> None:
        self._lib = lib = _loaded()
        w = weight.detach().to(torch.float32).contiguous()
        if w.dim() != 2:
            raise ValueError(f"amx_int8: the weight must be a 2-D matrix, got shape {tuple(w.shape)}")
        self.K, self.N = w.shape
        self.Kp, self.Np = _round_up(self.K, ALIGN), _round_up(self.N, ALIGN)
        size = self.Kp * self.Np
        if previous is not None and (previous.Kp, previous.Np) == (self.Kp, self.Np):
            self.down_layout, self.up_layout = previous.down_layout, previous.up_layout
        else:
            self.down_layout = torch.empty(size, dtype=torch.int8)
            self.up_layout = torch.empty(size, dtype=torch.int8)
        threads = torch.get_num_threads()
        amax = float(lib.seqep_absmax(w.data_ptr(), w.numel(), threads))
        if not math.isfinite(amax):
            raise ValueError("amx_int8: the weight holds NaN or inf entries; the run diverged (lower the learning "
                             "rate or beta, or resume from the last checkpoint)")
        self.scale = amax / 127.0 or 1.0
        lib.seqep_pack_int8(w.data_ptr(), self.K, self.N, self.scale, self.down_layout.data_ptr(),
                            self.up_layout.data_ptr(), self.Kp, self.Np, threads)

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
        acc = torch.empty(Mp * self.Kp, dtype=torch.int32)
        self._lib.seqep_up_int8(q.data_ptr(), r.data_ptr(), self.up_layout.data_ptr(), M, Mp, self.N, self.Np,
                                self.K, self.Kp, self.scale, out.data_ptr(), acc.data_ptr(), torch.get_num_threads())
        return out
