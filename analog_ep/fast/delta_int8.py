"""The large synapse's two int8 products, step after step, from the codes that changed (AVX2 kernels).

A relaxation settles unit by unit and sample by sample; once a row's int8 codes stop changing, the dense
products recompute the same integer sums at every step. `ChangeProducts` keeps each row's int32 sums between the
steps of one relaxation and updates them from the groups of codes that changed (`native/int8_delta_avx2.c`):
the result is the dense product of the new codes, bit for bit. What differs from the dense int8 path is the
scale: a row keeps its scale while its largest value stays within a factor `WIDEN` of it (so its codes can stay
the same), which costs at most log2(WIDEN) bits of resolution; a row whose values outgrow it, or that changes
many codes, is recomputed whole. And a kept row's code moves only where its value left it by more than 0.5 + band
steps (a dead band): quantised synchronous dynamics otherwise settle into two-step cycles, values hovering about a
rounding boundary and flipping its code at every step (at imdb-paper 12-15 of 32 rows, to the last step).
A zero row (a state that has not moved yet: the free phase's start, a nudged phase's difference before the nudge
reaches its layer) multiplies nothing, and a row that turns zero only has its sums cleared.

One object per relaxation and operand pair (`lowp_phi` keeps it in `LowPrecision`); rows are the batch's.

Example (the first step computes every row whole; the second, with nothing changed, computes nothing):
    >>> import torch
    >>> from analog_ep.fast import avx2_int8
    >>> if avx2_int8.available():
    ...     packed = avx2_int8.PackedInt8Avx2(torch.randn(40, 256) * 0.05)
    ...     products = ChangeProducts(packed)
    ...     h, x = torch.rand(3, 40), torch.rand(3, 256)
    ...     first = products.down_up(h, x)
    ...     second = products.down_up(h, x)
    ...     ok = bool(second.changed.any()) is False and torch.equal(first.up, second.up)
    ... else:
    ...     ok = True
    >>> ok
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from analog_ep.fast import avx2_int8
from analog_ep.fast.avx2_int8 import STRIP, PackedInt8Avx2

WIDEN = 4.0  # a row keeps its scale r while max|x| lies in [127 r / WIDEN, 127 r]: at most 2 bits coarser
# the dead band, in steps of a code (see above; a free phase's last steps round plainly: `lowp_phi.PLAIN_LAST`).
# The ±β phases of symmetric EP take PAIRED_BAND (their contrast is measured no further from float64 with it); a
# one-sided nudge with a small β does not (two-phase EP's GDU angle at β = 0.01: 3.6° with 0.25, 0.05° with 0.1)
BAND = 0.1
PAIRED_BAND = 0.25
DENSE_SHARE = 16  # a row with more than 1/DENSE_SHARE of its groups of 4 codes changed is recomputed whole


# work done against the dense products' (in groups of 4 codes × rows; retrievals in samples), since `reset_work`
_WORK: dict[str, list[int]] = {}


def reset_work() -> None:
    _WORK.clear()


def record_work(kind: str, done: int, dense: int) -> None:
    """Tally `done` units of work where the dense path does `dense` ("products", "retrievals")."""
    tally = _WORK.setdefault(kind, [0, 0])
    tally[0] += done
    tally[1] += dense


def work_done() -> dict[str, float]:
    """Share of the dense path's work each kind did since `reset_work` (what `seqep bench` reports)."""
    return {kind: done / dense for kind, (done, dense) in _WORK.items() if dense}


class StepProducts(NamedTuple):
    """One step's products: `down` = q_h·W·scale (h·W over `row_scale`), `up` = x·Wᵀ, and `changed` (M,) bool:
    the rows whose `down` changed since the previous step (the others are the same values as before)."""

    down: torch.Tensor
    row_scale: torch.Tensor
    up: torch.Tensor
    changed: torch.Tensor


class _Operand:
    """One operand's codes, scales and int32 sums across the steps, for one layout of W."""

    def __init__(self, rows: int, width: int, inputs: int, layout: torch.Tensor, strips: int, outputs: int) -> None:
        self.rows, self.width, self.inputs, self.layout = rows, width, inputs, layout
        self.strips, self.groups, self.outputs = strips, width // 4, outputs
        self.max_changes = max(1, self.groups // DENSE_SHARE)
        self.q = torch.zeros(rows, width, dtype=torch.int8)
        self.r = torch.zeros(rows, dtype=torch.float32)  # 0: no codes but zeros (none yet, or a zero row)
        self.acc = torch.zeros(rows, strips * STRIP, dtype=torch.int32)
        self.status = torch.empty(rows, dtype=torch.int32)
        self.count = torch.empty(rows, dtype=torch.int32)
        self.changed = torch.empty(rows, self.max_changes, dtype=torch.int32)
        self.old = torch.empty(rows, self.max_changes, dtype=torch.int32)
        self.new = torch.empty(rows, self.max_changes, dtype=torch.int32)

    def step(self, lib, values: torch.Tensor, band: float) -> torch.Tensor:
        """Quantise `values` (rows x inputs) against the previous codes, update the sums; the rows that changed."""
        threads = torch.get_num_threads()
        lib.seqep_quantize_delta_avx2(values.data_ptr(), self.rows, self.inputs, values.stride(0), self.q.data_ptr(),
                                      self.width, self.r.data_ptr(), WIDEN, band, self.max_changes,
                                      self.status.data_ptr(), self.changed.data_ptr(), self.old.data_ptr(),
                                      self.new.data_ptr(), self.count.data_ptr(), threads)
        whole = (self.status == 2).nonzero().flatten()
        few = (self.status == 1).nonzero().flatten()
        zeroed = (self.status == 3).nonzero().flatten()
        if zeroed.numel():  # rows that became zero: their products are zero, nothing to multiply
            self.acc.index_fill_(0, zeroed, 0)
        if whole.numel():
            lib.seqep_int8_rows_avx2(self.q.data_ptr(), self.width, whole.data_ptr(), whole.numel(),
                                     self.layout.data_ptr(), self.strips, self.groups, self.acc.data_ptr(),
                                     self.acc.shape[1], threads)
        if few.numel():
            lib.seqep_int8_changes_avx2(few.data_ptr(), few.numel(), self.changed.data_ptr(), self.old.data_ptr(),
                                        self.new.data_ptr(), self.count.data_ptr(), self.max_changes,
                                        self.layout.data_ptr(), self.strips, self.groups, self.acc.data_ptr(),
                                        self.acc.shape[1], threads)
        record_work("products", whole.numel() * self.groups + 2 * int(self.count[few].sum()), self.rows * self.groups)
        return self.status != 0


def _dequantise_into(lib, op: _Operand, rows: torch.Tensor, factor: torch.Tensor, out: torch.Tensor) -> None:
    """out[rows] = op's int32 sums of those rows × factor[row] (fp32 or bf16 `out`)."""
    index = rows.nonzero().flatten()
    if index.numel():
        lib.seqep_int8_dequantise_rows_avx2(op.acc.data_ptr(), op.acc.shape[1], index.data_ptr(), index.numel(),
                                            out.shape[1], factor.contiguous().data_ptr(), out.data_ptr(),
                                            out.shape[1], int(out.dtype == torch.bfloat16), torch.get_num_threads())


class ChangeProducts:
    """`Int8Weight`'s two products for the steps of one relaxation, from the codes that changed since the previous
    step (see the module's docstring): `down` (h·W over a row factor, and which rows changed) once a step, `up`
    (x·Wᵀ) once a step, or both from one state (`down_up`). The values `down` returns are a kept buffer, valid
    until the next step: read them, do not write them (`up`'s result and the row factors are the caller's)."""

    def __init__(self, packed: PackedInt8Avx2, down_dtype: torch.dtype = torch.float32, band: float | None = None,
                 band_steps: int | None = None) -> None:
        self.packed, self.down_dtype = packed, down_dtype
        self.band = BAND if band is None else band
        self.band_steps = band_steps  # steps that round with the band (None: all), plain rounding after them
        self.calls = 0  # steps so far (`down` calls)
        self._lib = avx2_int8._loaded()
        self._h: _Operand | None = None
        self._x: _Operand | None = None
        self.rows = 0

    def _check(self, t: torch.Tensor, width: int, name: str) -> None:
        if t.dim() != 2 or t.shape[1] != width or t.device.type != "cpu" or (self.rows and t.shape[0] != self.rows):
            rows = self.rows or "rows"
            raise ValueError(f"change products: {name} must be a CPU ({rows}, {width}) matrix (as many rows as the "
                             f"relaxation's other operand), got {tuple(t.shape)} on {t.device}")

    def _operands(self, rows: int) -> tuple[_Operand, _Operand]:
        if self._h is None:
            p = self.packed
            self.rows = rows
            self._h = _Operand(rows, p.Kp, p.K, p.down_layout, p.Np // STRIP, p.N)
            self._x = _Operand(rows, p.Np, p.N, p.up_layout, p.Kp // STRIP, p.K)
            self._down = torch.zeros(rows, p.N, dtype=self.down_dtype)
            self._up = torch.zeros(rows, p.K, dtype=torch.float32)
            self._down_factor = torch.full((rows,), p.scale, dtype=torch.float32)  # h·W over its row factor: W's scale
        return self._h, self._x

    def _band(self) -> float:
        return self.band if self.band_steps is None or self.calls <= self.band_steps else 0.0

    def down(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step's h·W over its row factor: (values, r (M, 1), changed (M,) bool: rows whose values moved)."""
        self._check(h, self.packed.K, "h")
        h_op, _ = self._operands(h.shape[0])
        self.calls += 1
        changed = h_op.step(self._lib, h.to(torch.float32).contiguous(), self._band())
        _dequantise_into(self._lib, h_op, changed, self._down_factor, self._down)
        return self._down, h_op.r.unsqueeze(1).clone(), changed

    def up(self, x: torch.Tensor) -> torch.Tensor:
        """One step's x·Wᵀ (fp32)."""
        self._check(x, self.packed.N, "x")
        _, x_op = self._operands(x.shape[0])
        moved = x_op.step(self._lib, x.to(torch.float32).contiguous(), self._band())
        _dequantise_into(self._lib, x_op, moved, x_op.r * self.packed.scale, self._up)
        return self._up.clone()

    def down_up(self, h: torch.Tensor, x: torch.Tensor) -> StepProducts:
        """Both products from one state (the synchronous schedule)."""
        self._check(x, self.packed.N, "x")  # before `down` moves h's codes: a bad x must leave nothing half done
        down, r, changed = self.down(h)
        return StepProducts(down, r, self.up(x), changed)
