"""The C kernels compile on every machine (a syntax check with the build's own flags: the AMX tests only run on AMX
CPUs), and oneDNN's int8 products, the int8 kernels a CPU without AMX runs, equal exact integer arithmetic."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from analog_ep.fast import native_kernels
from analog_ep.fast.lowp_weights import Int8Weight, _quantize_rows, int8_available

GCC = shutil.which("gcc")


SOURCES = [(kernels, source) for kernels in native_kernels.KERNEL_SETS for source in kernels.sources]


def test_there_are_sources_to_check() -> None:
    on_disk = {s.name for s in native_kernels.NATIVE.glob("*.c")}
    assert {s.name for _, s in SOURCES} == on_disk >= {"int8_amx.c", "retrieval_amx.c", "folded_avx2.c", "int8_avx2.c"}


@pytest.mark.skipif(GCC is None, reason="gcc is not installed: the C sources cannot be checked here")
@pytest.mark.parametrize("kernels, source", SOURCES, ids=lambda v: getattr(v, "name", ""))
def test_every_c_source_compiles_with_the_build_flags(kernels, source) -> None:
    done = subprocess.run([GCC, *kernels.flags, "-fsyntax-only", str(source)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{source.name} does not compile:\n{done.stderr[-2000:]}"


needs_onednn_int8 = pytest.mark.skipif(not int8_available(), reason="this torch build has no oneDNN int8 linear")


@pytest.fixture
def onednn_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """oneDNN's int8 kernels on every machine, AMX or not (`SEQEP_INT8_KERNEL=onednn`)."""
    monkeypatch.setenv("SEQEP_INT8_KERNEL", "onednn")


@needs_onednn_int8
@pytest.mark.parametrize("k, n", [(37, 203), (64, 64), (100, 1000), (40, 130)])
@pytest.mark.parametrize("rows", [1, 7, 32, 50])
def test_onednn_int8_products_equal_exact_integer_arithmetic(onednn_int8, k: int, n: int, rows: int) -> None:
    """What tests/fast/test_amx_int8.py checks of our AMX kernels: int32-exact sums of the int8 codes, then the
    fp32 scaling (and, for h·W, the bf16 rounding), here against an int64 product of the same codes."""
    gen = torch.Generator().manual_seed(k * 1000 + n + rows)
    w = torch.randn(k, n, generator=gen)
    weight = Int8Weight(w, rows_hint=rows)
    assert weight.kernel == "onednn"
    assert weight.scale == pytest.approx(float(w.abs().max()) / 127, rel=1e-6)
    wq = torch.round(w / torch.tensor(weight.scale)).clamp_(-127, 127).to(torch.int64)
    assert torch.equal(weight.q.to(torch.int64), wq)
    x, h = torch.randn(rows, n, generator=gen), torch.randn(rows, k, generator=gen)
    x[0] = 0.0  # a row of zeros: factor 1, all-zero codes

    qx, rx = _quantize_rows(x)
    want_up = (qx.to(torch.int64) @ wq.t()).float().mul_(rx * weight.scale)
    assert torch.equal(weight.up(x), want_up)

    qh, rh = _quantize_rows(h)
    want_down = ((qh.to(torch.int64) @ wq).float() * weight.scale).to(torch.bfloat16)
    got, r = weight.down_row_scaled(h)
    assert torch.equal(r, rh) and torch.equal(got, want_down)
    assert torch.equal(weight.down(h), want_down * rh.to(torch.bfloat16))
    down, r, up = weight.down_up(h, x)
    assert torch.equal(down, want_down) and torch.equal(r, rh) and torch.equal(up, want_up)
