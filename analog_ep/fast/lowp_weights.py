"""Low-precision copies of the large synapses and the two products EP takes with each of them.

Every relaxation step multiplies each big weight matrix W twice: bottom-up `x Wᵀ` (into the layer
above) and top-down `h W` (into the layer below). The weights are constant for a whole batch (free and
nudged phases), so they are converted once per batch and the conversion is paid back over the ~75–90
steps. Two kinds:

- `Bf16Weight`: W in bf16, products by oneDNN with fp32 accumulation (the `bf16` fast path).
- `Int8Weight`: W quantised symmetrically to int8 (one scale per matrix), activations quantised per
  row on the fly (int8 × int8 → int32), by one of three kernel sets with the same numbers: ours on AMX
  (`amx_int8`), ours on AVX2 (`avx2_int8`, where AMX is missing), oneDNN's (`SEQEP_INT8_KERNEL=onednn`,
  or where neither of ours loads). At the paper's IMDB shape a bf16 product of the
  180 M-weight matrix at batch 32 is bound by oneDNN re-packing the weights on every call; the int8
  products skip that and read half the bytes (docs/history.md). `h W` needs oneDNN's
  pre-packed layout (qlinear; plain `_int_mm` takes 2-3× as long), `x Wᵀ` does not: `_int_mm` on a
  transposed view of the plain int8 matrix is as fast as the pre-packed product (11.4 vs ~10-12.7 ms at
  32 rows, 14.8 ms both at 64), so that orientation's packing (~340 ms a batch) is skipped.
  Each product carries ~1 % relative error; the nudged phases take them on differences from the free
  fixed point (`lowp_phi.DeltaBase`), so that error scales with the EP signal, and `seqep bench
  --check-fidelity` measures the update's angle to float64.
"""

from __future__ import annotations

import functools
import os

import torch

from analog_ep.fast import amx_int8, avx2_int8, native_kernels

INT8_MAX = 127.0
# oneDNN's bf16 x·Wᵀ at the SNLI paper shape (K = 30,000, N = 400) takes ~15.5 ms for 512 rows but ~4 ms for 256
# and ~5.5 ms for 384 (docs/history.md): row blocks avoid the cliff
UP_MAX_ROWS = 384


class Bf16Weight:
    """W in bf16, refreshed in place in a buffer kept across batches (a fresh 360 MB buffer, its pages
    faulted in, costs more than the conversion)."""

    def __init__(self, weight: torch.Tensor, previous: Bf16Weight | None = None) -> None:
        buf = previous.w if isinstance(previous, Bf16Weight) else None
        w = weight.detach()
        if buf is not None and buf.shape == w.shape:
            self.w = buf.copy_(w)
        else:
            self.w = w.to(torch.bfloat16)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ, bf16 result; more than UP_MAX_ROWS rows go through in equal row blocks."""
        x = x.to(torch.bfloat16)
        blocks = -(-x.shape[0] // UP_MAX_ROWS)
        if blocks == 1:
            return torch.mm(x, self.w.t())
        return torch.cat([torch.mm(part, self.w.t()) for part in x.chunk(blocks)])

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """h W, bf16 result."""
        return torch.mm(h.to(torch.bfloat16), self.w)

    def down_row_scaled(self, h: torch.Tensor) -> tuple[torch.Tensor, None]:
        """`down` as (product, row factor still to apply): bf16 products need none."""
        return self.down(h), None

    def down_up(self, h: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, None, torch.Tensor]:
        """`down_row_scaled(h)` and `up(x)` (one state's two products; no shared pass in bf16)."""
        return self.down(h), None, self.up(x)


@functools.cache
def _emulates_bf16_here() -> bool:
    return native_kernels.emulates_bf16(native_kernels.cpu_flags() or ())


def lowp_dtype(device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the int8 mode's other low-precision operands (retrieval, projection states, contrast): bf16,
    or fp32 on a CPU without bf16 dot products, where torch would emulate every bf16 product (26-49× slower)."""
    return torch.float32 if torch.device(device).type == "cpu" and _emulates_bf16_here() else torch.bfloat16


def _onednn_int8() -> bool:
    ops = getattr(torch.ops, "onednn", None)
    return (torch.backends.mkldnn.is_available() and ops is not None and hasattr(ops, "qlinear_prepack")
            and hasattr(ops, "qlinear_pointwise"))


def _onednn_forced() -> bool:
    return os.environ.get("SEQEP_INT8_KERNEL", "").lower() == "onednn"


def int8_kernel() -> str | None:
    """The int8 kernel set `Int8Weight` runs in this process: "amx", "avx2" (ours), "onednn", or None (none works
    here). `SEQEP_INT8_KERNEL=avx2|onednn` (read per call) skips the sets above it, to compare them."""
    if amx_int8.available():
        return "amx"
    if not _onednn_forced() and avx2_int8.available():
        return "avx2"
    return "onednn" if _onednn_int8() else None


def int8_available(device: torch.device | str = "cpu") -> bool:
    """The tensors live on the CPU and one of the int8 kernel sets works here (`int8_kernel`)."""
    return torch.device(device).type == "cpu" and int8_kernel() is not None


def _quantize_weight(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """round(W / scale) as int8, and its transpose made contiguous (oneDNN's int8 pre-packing reads its
    input as row-major whatever the strides: a transposed view would be packed as garbage)."""
    q = torch.round(w / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, q.t().contiguous()


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: x ≈ q · r, r = max|x_row| / 127 (rows of zeros get r = 1, q = 0)."""
    x = x.to(torch.float32)
    amax = x.abs().amax(1, keepdim=True)
    r = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(x * (1.0 / r)).to(torch.int8), r  # times 1/r, not / r: one division per row, not per entry


def int8_kernel_name() -> str:
    """Which int8 kernels `Int8Weight` runs in this process: ours on AMX or AVX2, or oneDNN's (and why not ours)."""
    kernel = int8_kernel()
    if kernel == "amx":
        return "amx (analog_ep/fast/native/int8_amx.c)"
    if kernel == "avx2":
        return f"avx2 (analog_ep/fast/native/int8_avx2.c; no AMX kernels: {amx_int8.unavailable_reason()})"
    return f"onednn (AMX kernels: {amx_int8.unavailable_reason()}; AVX2 kernels: {avx2_kernels_reason()})"


def avx2_kernels_reason() -> str:
    """Why our AVX2 int8 kernels do not run in this process."""
    if _onednn_forced():
        return "SEQEP_INT8_KERNEL=onednn"
    return avx2_int8.unavailable_reason() or "available"


_KERNELS: dict[str, object] = {}


def enable_compiled_quantizers(enabled: bool = True) -> None:
    """Fuse the per-product row quantisation and the per-batch weight quantisation into one pass each (the oneDNN
    int8 path only: our AMX kernels quantise in C, and not compiling keeps inductor out of the process)."""
    if enabled and not _KERNELS and int8_kernel() == "onednn":
        _KERNELS["rows"] = torch.compile(_quantize_rows, dynamic=True)
        _KERNELS["weight"] = torch.compile(_quantize_weight, dynamic=False)
    elif not enabled:
        _KERNELS.clear()


class Int8Weight:
    """W as int8 (one scale), activations int8 per row. Three kernel sets give the same numbers (`int8_kernel`):
    our AMX kernels (`amx_int8`: packed in ~25 ms, products at the memory-bandwidth roofline, both of a step's
    products in one read of W), our AVX2 kernels (`avx2_int8`: about twice the fp32 rate on a CPU without
    AMX), else oneDNN's (plain `_int_mm` for `x Wᵀ`, pre-packed `h W`).

    `down_dtype`: the dtype of the h·W results, bf16 (what the AMX and oneDNN kernels write) or fp32 (for a
    CPU without bf16 instructions, where the AVX2 kernels write it directly)."""

    def __init__(self, weight: torch.Tensor, rows_hint: int = 32, previous: Int8Weight | None = None,
                 down_dtype: torch.dtype = torch.bfloat16) -> None:
        self.kernel = int8_kernel() if torch.device(weight.device).type == "cpu" else None
        if self.kernel is None:
            raise RuntimeError("precision 'int8' needs a CPU with AVX2 or AMX and a C compiler, or a CPU torch "
                               "build with oneDNN's quantised linear (torch.ops.onednn.qlinear_prepack); use "
                               "precision 'bf16' on this device")
        self.down_dtype = down_dtype
        if self.kernel in ("amx", "avx2"):
            ours = previous.packed if isinstance(previous, Int8Weight) and previous.kernel == self.kernel else None
            packer = amx_int8.PackedInt8 if self.kernel == "amx" else avx2_int8.PackedInt8Avx2
            self.packed = packer(weight, ours)
            self.scale = self.packed.scale
            return
        w = weight.detach().to(torch.float32)
        lo, hi = torch.aminmax(w)
        s = max(float(hi), -float(lo)) / INT8_MAX or 1.0
        q, q_t = _KERNELS.get("weight", _quantize_weight)(w, torch.tensor(s))
        out_f, in_f = q.shape
        self.q, self.scale = q, s
        self.packed_down = torch.ops.onednn.qlinear_prepack(q_t, [rows_hint, out_f])
        self.scale_down = torch.full((in_f,), s)
        self.zero_down = torch.zeros(in_f, dtype=torch.int64)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ, fp32 result (small: one row per sample of the layer above)."""
        if self.kernel in ("amx", "avx2"):
            return self.packed.up(x)
        q, r = _KERNELS.get("rows", _quantize_rows)(x)
        return torch._int_mm(q, self.q.t()).to(torch.float32).mul_(r * self.scale)

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """h W, in `down_dtype` (bf16 unless set)."""
        y, r = self.down_row_scaled(h)
        return y.mul_(r.to(y.dtype))

    def down_row_scaled(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h W as (h W / r, r): r (B, 1) is the per-row factor of h's quantisation, left for the caller to fold
        into a later, smaller product (the retrieval's scores: `retrieval.Query`) instead of a pass over
        the (B, 180,000) result."""
        if self.kernel == "avx2":
            return self.packed.down_row_scaled(h, self.down_dtype)
        if self.kernel == "amx":
            y, r = self.packed.down_row_scaled(h)
            return y.to(self.down_dtype), r
        q, r = _KERNELS.get("rows", _quantize_rows)(h)
        y = torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, self.packed_down, self.scale_down, self.zero_down, None,
                                               1.0, 0, torch.bfloat16, "none", [], "")
        # bf16 output, converted: oneDNN's fp32-output variant saturates an int16 partial sum now and then on an
        # AVX2-only CPU (one sum in 1,536 off by 155 codes, tests/fast/test_avx2_int8.py), its bf16 one does not
        return y.to(self.down_dtype), r

    def down_up(self, h: torch.Tensor, x: torch.Tensor, x_absmax: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`down_row_scaled(h)` and `up(x)` from one state: on AMX in one read of W (`PackedInt8.down_up`:
        at 32-64 rows both products are bound by streaming W from memory), the same numbers either way.
        `x_absmax`: max |x| per row if known (saves a pass over x on AMX; ignored otherwise). The AVX2 kernels
        take the two products one after the other: at IMDB's shape they are compute-bound, not memory-bound."""
        if self.kernel == "amx":
            down, r, up = self.packed.down_up(h, x, x_absmax)
            return down.to(self.down_dtype), r, up
        return (*self.down_row_scaled(h), self.up(x))


LowPrecisionWeight = Bf16Weight | Int8Weight
