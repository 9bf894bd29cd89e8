"""The machine a report was measured on: versions, CPU, caches, ISA, memory, and its matmul peaks."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Any

import torch

from analog_ep.fast import native_kernels


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (2048, 4096), seconds: float = 1.0) -> dict:
    """Best achieved GFLOP/s of a square matmul of each size (the best over a few repetitions)."""
    best: dict[str, float] = {}
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)
        rates, start = [], time.perf_counter()
        while len(rates) < 3 or (time.perf_counter() - start < seconds and len(rates) < 20):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        best[str(n)] = max(rates)
    return {"gflops": max(best.values()), "by_size": best}


def machine_info() -> dict:
    from analog_ep.train.run_dir import source_commit

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "commit": source_commit(),
                            "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["cpu"] = fields.get("Model name")
        info["caches"] = {k: fields[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in fields}
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    flags = native_kernels.cpu_flags() or []
    info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile") if f in flags]
    try:
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info
