"""Our C kernels for the CPU fast path (sources in `native/`), built on first use and loaded through ctypes.

Two kernel sets, each built with the system C compiler into a cache folder (under a second, once per source
version; no torch headers, so the build does not depend on the torch version) and loaded into the process,
where they share torch's OpenMP runtime. Where the CPU lacks a set's instructions, no compiler is found, or the
build fails, `library(set)` is None with the reason in `unavailable_reason(set)`, and every user falls back to
torch's kernels (same numbers: each native kernel is tested against its torch twin).

- `AMX` (AVX-512 with AMX): `amx_int8`, the large synapse's int8 products (`native/int8_amx.c`), and
  `retrieval`, the whole Hopfield retrieval (scores, softmax, values) in one AMX bf16 pass
  (`native/retrieval_amx.c`), in place of torch's batched products and the torch.compile'd softmax.
- `AVX2` (AVX2 with FMA: every x86-64 CPU since 2013): `folded`, both products of a folded relaxation step in
  one pass over the folded synapse (`native/folded_avx2.c`), `avx2_int8`, the large synapse's int8
  products where the AMX kernels cannot run (`native/int8_avx2.c`) and the same products updated from the codes
  that changed since the last step (`native/int8_delta_avx2.c`, `delta_int8`), and `retrieval`'s fp32 retrieval over a
  group of distinct keys with few queries, in one pass per block of queries (`native/retrieval_avx2.c`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NATIVE = Path(__file__).parent / "native"
BF16_INSTRUCTIONS = ("avx512_bf16", "amx_bf16")  # CPU flags of bf16 dot products (without them bf16 is emulated)
X86_BASELINE = ("sse2", "avx2")  # flags that say the CPU's x86 instruction sets were read (not another architecture)


def _declare_amx(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.seqep_amx_init.restype = i32
    lib.seqep_absmax.argtypes, lib.seqep_absmax.restype = [p, i64, i32], f32
    lib.seqep_pack_int8.argtypes = [p, i64, i64, f32, p, p, i64, i64, i32]
    lib.seqep_down_int8.argtypes = [p, p, i64, i64, i64, i64, i64, f32, p, i32]
    lib.seqep_up_int8.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, f32, p, p, i32]
    lib.seqep_down_to_up.argtypes = [p, i64, i64, p, i32]
    lib.seqep_down_up_int8.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, f32, p, p, p, p, p, i64, i32]
    lib.seqep_pack_keys.argtypes = [p, p, i64, i64, i64, i64, i64, p, p, i32]
    lib.seqep_retrieve.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i32, p, p, p, i32]
    lib.seqep_quantize_rows.argtypes = [p, i32, i64, i64, i64, p, i64, i64, p, i32]
    if lib.seqep_amx_init() != 0:
        raise RuntimeError("the kernel refused this process AMX state (arch_prctl ARCH_REQ_XCOMP_PERM failed)")


def _declare_avx2(lib: ctypes.CDLL) -> None:
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.seqep_fold_products.argtypes = [p, p, p, p, p, p, f32, p, p, i64, i64, i64, i64, i64, i64, i32]
    lib.seqep_quantize_rows_avx2.argtypes = [p, i64, i64, i64, p, i64, i64, p, i32]
    lib.seqep_pack_int8_avx2.argtypes = [p, i64, i64, f32, p, p, i64, i64, i32]
    lib.seqep_absmax_avx2.argtypes, lib.seqep_absmax_avx2.restype = [p, i64, i32], f32
    lib.seqep_retrieve_f32.argtypes = [p, p, p, p, i64, p, i64, i64, i64, i64, p, i32]
    lib.seqep_up_int8_avx2.argtypes = [p, p, p, i64, i64, i64, i64, i64, f32, p, i32]
    lib.seqep_down_int8_avx2.argtypes = [p, p, i64, i64, i64, i64, i64, f32, p, i32, i32]
    lib.seqep_quantize_delta_avx2.argtypes = [p, i64, i64, i64, p, i64, p, f32, f32, i64, p, p, p, p, p, i32]
    lib.seqep_int8_rows_avx2.argtypes = [p, i64, p, i64, p, i64, i64, p, i64, i32]
    lib.seqep_int8_changes_avx2.argtypes = [p, i64, p, p, p, p, i64, p, i64, i64, p, i64, i32]
    lib.seqep_int8_dequantise_rows_avx2.argtypes = [p, i64, p, i64, i64, p, p, i64, i32, i32]


@dataclass(frozen=True)
class KernelSet:
    """C sources built together with one set of instruction-set flags, for CPUs with `cpu_flags`."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...]
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    declare: Callable[[ctypes.CDLL], None]  # argument types, and any per-process set-up


AMX = KernelSet("amx", (NATIVE / "int8_amx.c", NATIVE / "retrieval_amx.c"), (NATIVE / "common.h",),
                ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                 "-mamx-tile", "-mamx-int8", "-mamx-bf16"),
                ("amx_tile", "amx_int8", "amx_bf16", "avx512bw", "avx512vl", "avx512_bf16"), _declare_amx)
AVX2 = KernelSet("avx2", (NATIVE / "folded_avx2.c", NATIVE / "int8_avx2.c", NATIVE / "int8_delta_avx2.c",
                          NATIVE / "retrieval_avx2.c"), (NATIVE / "int8_avx2.h",),
                 ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx2", "-mfma"),
                 ("avx2", "fma"), _declare_avx2)
KERNEL_SETS = (AMX, AVX2)

_state: dict[str, tuple[ctypes.CDLL | None, str]] = {}


def cache_dir() -> Path:
    base = os.environ.get("SEQEP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "seqep")
    return Path(base) / "native"


def cpu_flags() -> list[str] | None:
    """The CPU's feature flags as Linux names them (/proc/cpuinfo), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])


def emulates_bf16(flags: tuple[str, ...] | list[str]) -> bool:
    """Whether CPU `flags` are an x86 CPU's without bf16 dot-product instructions, where torch emulates every bf16
    product. False where the flags do not say (another architecture, none read): nothing is refused on a guess."""
    have = set(flags)
    return bool(have & set(X86_BASELINE)) and not have & set(BF16_INSTRUCTIONS)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which platform.processor() leaves empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_missing(kernels: KernelSet) -> list[str]:
    if not sys.platform.startswith("linux"):
        return ["Linux (the kernels read /proc/cpuinfo; AMX also needs its arch_prctl permission call)"]
    flags = cpu_flags()
    if flags is None:
        return ["/proc/cpuinfo"]
    return [f for f in kernels.cpu_flags if f not in flags]


def _build(kernels: KernelSet) -> Path:
    """Compile a kernel set once per (sources, flags, compiler); atomic, so concurrent builds cannot clash."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    digest = hashlib.sha256(" ".join([cc, *kernels.flags]).encode())
    for source in kernels.sources + kernels.headers:
        digest.update(source.name.encode() + source.read_bytes())
    target = cache_dir() / f"seqep-{kernels.name}-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([cc, *kernels.flags, *map(str, kernels.sources), "-lm", "-o", str(built)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {', '.join(s.name for s in kernels.sources)}: "
                               f"{done.stderr.strip()[-400:]}")
        os.replace(built, target)
    return target


def _load(kernels: KernelSet) -> ctypes.CDLL:
    missing = _cpu_missing(kernels)
    if missing:
        raise RuntimeError(f"this CPU lacks {', '.join(missing)}")
    lib = ctypes.CDLL(str(_build(kernels)))
    kernels.declare(lib)
    return lib


def library(kernels: KernelSet = AMX) -> ctypes.CDLL | None:
    """A kernel set, loaded, or None (reason in `unavailable_reason(kernels)`); tried once per process."""
    if kernels.name not in _state:
        if os.environ.get("SEQEP_NATIVE", "1") == "0":
            _state[kernels.name] = (None, "SEQEP_NATIVE=0")
        else:
            try:
                _state[kernels.name] = (_load(kernels), "")
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state[kernels.name] = (None, str(exc))
    return _state[kernels.name][0]


def unavailable_reason(kernels: KernelSet = AMX) -> str:
    library(kernels)
    return _state[kernels.name][1]


def forget() -> None:
    """Forget the load attempt, so that the next use tries again (after changing SEQEP_NATIVE or CC)."""
    _state.clear()
