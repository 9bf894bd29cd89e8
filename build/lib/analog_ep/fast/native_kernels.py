"""Our C kernels for the CPU fast path (sources in `native/`), built on first use and loaded through ctypes.

Built with the system C compiler into a cache folder (under a second, once per source version; no torch
headers, so the build does not depend on the torch version) and loaded into the process, where they share
torch's OpenMP runtime. Where the CPU lacks AVX-512 with AMX, no compiler is found, or the build fails,
`library()` is None with the reason in `unavailable_reason()`, and every user falls back to torch's kernels
(same numbers: each native kernel is tested against its torch twin). Users:

- `amx_int8`: the large synapse's int8 products (`native/int8_amx.c`);
- `retrieval`: the whole Hopfield retrieval (scores, softmax, values) in one AMX bf16 pass
  (`native/retrieval_amx.c`), in place of torch's batched products and the torch.compile'd softmax.
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
from pathlib import Path

SOURCES = sorted((Path(__file__).parent / "native").glob("*.c"))
HEADERS = sorted((Path(__file__).parent / "native").glob("*.h"))
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
         "-mamx-tile", "-mamx-int8", "-mamx-bf16"]
CPU_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512bw", "avx512vl", "avx512_bf16")

_state: dict[str, object] = {}


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


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), which platform.processor() leaves empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_missing() -> list[str]:
    if not sys.platform.startswith("linux"):
        return ["Linux (AMX needs its arch_prctl permission call)"]
    flags = cpu_flags()
    if flags is None:
        return ["/proc/cpuinfo"]
    return [f for f in CPU_FLAGS if f not in flags]


def _build() -> Path:
    """Compile the kernels once per (sources, flags, compiler); atomic, so concurrent builds cannot clash."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    digest = hashlib.sha256(" ".join([cc, *FLAGS]).encode())
    for source in SOURCES + HEADERS:
        digest.update(source.name.encode() + source.read_bytes())
    target = cache_dir() / f"seqep-kernels-{digest.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-lm", "-o", str(built)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {', '.join(s.name for s in SOURCES)}: "
                               f"{done.stderr.strip()[-400:]}")
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
    lib.seqep_down_to_up.argtypes = [p, i64, i64, p, i32]
    lib.seqep_down_up_int8.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i64, f32, p, p, p, p, p, i64, i32]
    lib.seqep_pack_keys.argtypes = [p, p, i64, i64, i64, i64, i64, p, p, i32]
    lib.seqep_retrieve.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i32, p, p, p, i32]
    lib.seqep_quantize_rows.argtypes = [p, i32, i64, i64, i64, p, i64, i64, p, i32]
    if lib.seqep_amx_init() != 0:
        raise RuntimeError("the kernel refused this process AMX state (arch_prctl ARCH_REQ_XCOMP_PERM failed)")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (reason in `unavailable_reason()`); tried once per process."""
    if "lib" not in _state:
        if os.environ.get("SEQEP_NATIVE", "1") == "0":
            _state["lib"], _state["why"] = None, "SEQEP_NATIVE=0"
        else:
            try:
                _state["lib"], _state["why"] = _load(), ""
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state["lib"], _state["why"] = None, str(exc)
    return _state["lib"]  # type: ignore[return-value]


def unavailable_reason() -> str:
    library()
    return str(_state["why"])


def forget() -> None:
    """Forget the load attempt, so that the next use tries again (after changing SEQEP_NATIVE or CC)."""
    _state.clear()
