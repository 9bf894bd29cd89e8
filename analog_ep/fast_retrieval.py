"""The fast path's Hopfield retrieval, taken over each sequence's *distinct* keys only: exact, and cheaper.

A key that occurs c times in a sequence (a repeated word, or padding) gets the same score from every
query and returns the same value, so softmax over the L keys equals softmax over the U distinct ones
with log c added to their scores. Real reviews padded to 600 tokens hold ~137 distinct keys on average
(IMDB train, w2v:300, padding counted once), SNLI sentences padded to 25 about 11: the fast path's
(Lq × L) score matrices shrink to (Lq × U). Consecutive rows are grouped, each group padded to its own
largest U with zero keys of count 0 (score −∞), so that one long review need not pad the whole batch
(`_partition` picks the groups from a cost model). Inputs without repeats (random vectors) form one
group of all rows: the same products as a plain retrieval.

Rows are the flattened (B·P) retrievals of a batch (P projection layers). The exact path does not use
this module: it stays the plain L × L retrieval (`analog_ep.hopfield`), the oracle this one is tested
against.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from analog_ep import native_kernels

# Cost model of one group of rows, in multiply-add equivalents: the two bmms take 2·Lq·d per row and key,
# the fused softmax ~350 per score element, and each group ~3e8 whatever its size (three kernel calls plus
# the compiled softmax's guards, and a cold start for each operand). GROUP_COST was set by measurement, not
# derived: at imdb-paper batch 32 on real reviews, splitting into 17 groups (23 % of the L × L scores kept)
# was no faster than one group (46 %), 3 groups (37 %) marginally the fastest (session 5).
SOFTMAX_COST = 350
GROUP_COST = 3e8
MAX_CANDIDATES = 64  # group boundaries considered (rows are taken in blocks beyond this many)
_HASH_SEED = 20231115  # fixed random direction that tells distinct key vectors apart (checked exactly after)
_CHECK_ROWS = 64  # rows per block of that exact check


class Query(NamedTuple):
    """The per-step half of the projection layer's query, (B, P, Lq, d), and a per-sample factor (B, 1) it still
    has to be multiplied by, or None. The factor is the int8 product's dequantisation (`Int8Weight.
    down_row_scaled`): applied to the (Lq × U) scores inside the softmax kernel, it costs nothing, where a pass
    over the (Lq × d) query costs ~2-6 ms a step at IMDB's shape."""

    values: torch.Tensor
    row_scale: torch.Tensor | None = None


@dataclass
class KeyGroup:
    """Consecutive rows of the flattened batch whose distinct keys are stored together, padded to the group's
    largest count U."""

    rows: slice  # rows of the flattened (B·P) batch
    keys: torch.Tensor  # (n, U, d) distinct keys (values of the retrieval), low precision, zero past a row's count
    keys_t: torch.Tensor  # (n, d, U) γ·keysᵀ, low precision (the contiguous operand of the scores)
    const: torch.Tensor | None  # (n, Lq, U) fp32: γ·(X W₀ᵀ) keysᵀ + log(count), −inf on padding; free phase only
    has_empty: bool  # some row has no key at all (every key masked): its softmax row is NaN, read as zeros


def _hash_direction(dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(_HASH_SEED), dtype=torch.float64)


def _distinct(keys: torch.Tensor, key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of (N, L, d) keys: the distinct unmasked keys (N, L, d), their counts (N, L) and how many (N,).

    Distinct vectors are told apart by a projection on a fixed random direction (float64) and the result
    is checked exactly; if two different keys ever collided the row set falls back to no merging.
    """
    n, length, d = keys.shape
    direction = _hash_direction(d).to(keys.device)
    code = torch.cat([part.to(torch.float64) @ direction for part in keys.split(64)])  # no float64 copy of all
    valid = torch.ones(n, length, dtype=torch.bool, device=keys.device) if key_mask is None else key_mask
    code = code.masked_fill(~valid, float("inf"))  # masked keys sort last and count for nothing
    sorted_code, order = code.sort(-1)
    valid_sorted = valid.gather(1, order)
    first = torch.ones_like(valid_sorted)
    first[:, 1:] = sorted_code[:, 1:] != sorted_code[:, :-1]
    first &= valid_sorted
    slot = (first.cumsum(-1) - 1).clamp_min_(0)  # distinct-key slot of every sorted position
    counts = keys.new_zeros(n, length).scatter_add_(1, slot, valid_sorted.to(keys.dtype))
    rows = torch.arange(n, device=keys.device).unsqueeze(1).expand_as(first)
    source = torch.zeros(n, length, dtype=torch.long, device=keys.device)
    source[rows[first], slot[first]] = order[first]
    distinct = keys.gather(1, source.unsqueeze(-1).expand(-1, -1, d)).mul_((counts > 0).unsqueeze(-1))
    position_slot = torch.empty_like(slot).scatter_(1, order, slot)
    for rows_ in range(0, n, _CHECK_ROWS):  # in blocks: a full-size rebuilt copy would set the batch's peak memory
        part = slice(rows_, rows_ + _CHECK_ROWS)
        rebuilt = distinct[part].gather(1, position_slot[part].unsqueeze(-1).expand(-1, -1, d))
        if (rebuilt != keys[part]).logical_and_(valid[part].unsqueeze(-1)).any():  # a hash collision: keep every key
            counts = valid.to(keys.dtype)
            return keys * valid.unsqueeze(-1), counts, valid.sum(-1)
    return distinct, counts, first.sum(-1)


def _partition(sizes: list[int], query_len: int, dim: int) -> list[slice]:
    """Consecutive rows into groups, each padded to its largest size: the split of least modelled cost.

    Consecutive, not sorted: a group is then a view of the batch (no gathering of queries or scattering of
    results, which cost more than the padding they save at IMDB's shape). Exact dynamic programme over
    ≤ MAX_CANDIDATES boundaries; rows whose whole retrieval costs less than a group's overhead are taken in
    blocks (SNLI's short sentences end up in one or two groups, an IMDB batch of 32 in a few).
    """
    n = len(sizes)
    per_key = 2 * query_len * dim + SOFTMAX_COST * query_len
    block = max(1, -(-n // MAX_CANDIDATES), int(GROUP_COST // (per_key * max(max(sizes), 1))))
    edges = list(range(0, n, block)) + [n]
    best = [0.0] + [float("inf")] * (len(edges) - 1)
    cut = [0] * len(edges)
    for j in range(1, len(edges)):
        width = 0
        for i in range(j - 1, -1, -1):  # group edges[i]..edges[j]; width = its largest size
            width = max(width, max(sizes[edges[i]:edges[i + 1]]))
            cost = best[i] + (edges[j] - edges[i]) * max(width, 1) * per_key + GROUP_COST
            if cost <= best[j]:  # on a tie, the larger group (fewer kernel calls)
                best[j], cut[j] = cost, i
    groups, j = [], len(edges) - 1
    while j > 0:
        groups.append(slice(edges[cut[j]], edges[j]))
        j = cut[j]
    return groups[::-1]


def kept_fraction(keys: torch.Tensor, key_mask: torch.Tensor | None = None, query_len: int | None = None) -> float:
    """Score columns the fast path computes for (B, P, L, d) keys, over the L of a plain retrieval."""
    length, dim = keys.shape[-2:]
    sizes = _distinct(keys.reshape(-1, length, dim), None if key_mask is None else key_mask.reshape(-1, length))[2]
    sizes = sizes.tolist()
    groups = _partition(sizes, query_len or length, dim)
    return sum((g.stop - g.start) * max(max(sizes[g]), 1) for g in groups) / (len(sizes) * length)


class DistinctKeys:
    """The keys of a batch's retrievals, deduplicated and grouped, with the retrieval's three kernels."""

    def __init__(self, groups: list[KeyGroup], shape: tuple[int, int, int, int], seq_len: int) -> None:
        self.groups = groups
        self.shape = shape  # (B, P, Lq, d) of the queries and of the retrieved state
        self.seq_len = seq_len  # L: keys per row before deduplication

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def build(cls, keys: torch.Tensor, key_mask: torch.Tensor | None, query_drive: torch.Tensor,
              gamma: float, dtype: torch.dtype) -> DistinctKeys:
        """keys (B, P, L, d) in the parameters' dtype, key_mask (B, P, L) (True = real) or None, query_drive
        (B, P, Lq, d): X W₀ᵀ, or the learned queries when pooling."""
        batch, proj, seq_len, dim = keys.shape
        mask = None if key_mask is None else key_mask.reshape(-1, seq_len)
        distinct, counts, sizes = _distinct(keys.reshape(-1, seq_len, dim), mask)
        query_len = query_drive.shape[2]
        query_drive = query_drive.reshape(-1, query_len, dim)
        log_counts = counts.log()  # log 0 = −inf: padding columns and masked keys take no weight
        sizes_list = sizes.tolist()
        groups = []
        for rows in _partition(sizes_list, query_len, dim):
            width = max(max(sizes_list[rows]), 1)
            k = distinct[rows, :width].contiguous()
            # one fp32 temporary, not two; a copy even when the transposed view counts as contiguous (U or d = 1)
            scaled_t = k.transpose(-1, -2).clone(memory_format=torch.contiguous_format).mul_(gamma)
            # kept in fp32: these logits are large, their rounding is not
            const = torch.matmul(query_drive[rows], scaled_t).add_(log_counts[rows, :width].unsqueeze(1))
            groups.append(KeyGroup(rows, k.to(dtype), scaled_t.to(dtype), const, min(sizes_list[rows]) == 0))
        return cls(groups, (batch, proj, query_len, dim), seq_len)

    @property
    def kept_fraction(self) -> float:
        """Score columns computed over those of a plain retrieval: Σ_groups n·U / (N·L)."""
        kept = sum((g.rows.stop - g.rows.start) * g.keys.shape[1] for g in self.groups)
        return kept / (self.rows * self.seq_len)

    def repeat(self, times: int, constants: bool = True) -> DistinctKeys:
        """The same keys for the batch stacked `times` (the ±β phases: the free phase's `const` is not needed
        there, `constants=False` leaves it out). Groups are shared, not copied: copy r of group g reads the
        same tensors at rows shifted by r·N."""
        n = self.rows
        groups = [KeyGroup(slice(g.rows.start + r * n, g.rows.stop + r * n), g.keys, g.keys_t,
                           g.const if constants else None, g.has_empty)
                  for r in range(times) for g in self.groups]
        return DistinctKeys(groups, (self.shape[0] * times, *self.shape[1:]), self.seq_len)

    @staticmethod
    def repeat_weights(weights: list[torch.Tensor], times: int) -> list[torch.Tensor]:
        """Per-group attention weights for the batch stacked `times`, in `repeat`'s group order."""
        return weights * times

    def _flat(self, query: Query) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query values as (B·P, Lq, d) and its row factor as (B·P, 1, 1) (or None)."""
        scale = query.row_scale
        if scale is not None:
            scale = scale.to(_wide(scale)).repeat_interleave(self.shape[1], dim=0).view(-1, 1, 1)
        return query.values.reshape(self.rows, *self.shape[2:]), scale

    def _assemble(self, product: Callable[[int, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """(B, P, Lq, d) from `product(i, out)` of each group i, written straight into its rows."""
        if len(self.groups) == 1:
            return product(0, None).view(self.shape)
        out = torch.empty(self.rows, *self.shape[2:], dtype=self.groups[0].keys.dtype,
                          device=self.groups[0].keys.device)
        for i, g in enumerate(self.groups):
            product(i, out[g.rows])
        return out.view(self.shape)

    def attention(self, top_down: Query) -> list[torch.Tensor]:
        """Free phase: softmax(γ (X W₀ᵀ + top_down) Kᵀ + log count), per group, from top_down (B, P, Lq, d)."""
        kernel = _COMPILED.get("attention", _attention_eager)
        flat, scale = self._flat(top_down)
        return [kernel(g.const, torch.bmm(flat[g.rows], g.keys_t), None if scale is None else scale[g.rows],
                       g.has_empty) for g in self.groups]

    def values(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Σ_u weight_u · key_u: the retrieved state (B, P, Lq, d)."""
        return self._assemble(lambda i, out: torch.bmm(weights[i], self.groups[i].keys, out=out))

    def retrieve(self, top_down: Query) -> torch.Tensor:
        """One free-phase retrieval: the projection layer's new state (B, P, Lq, d)."""
        return self.values(self.attention(top_down))

    def delta_retrieve(self, base: list[torch.Tensor], delta_q: Query) -> torch.Tensor:
        """Nudged phases: s(Q* + δQ) − s(Q*) from A* = `base` (per group) and δQ (B, P, Lq, d), without
        cancellation (`delta_attention`)."""
        flat, scale = self._flat(delta_q)

        def product(i: int, out: torch.Tensor | None) -> torch.Tensor:
            g = self.groups[i]
            delta_scores = torch.bmm(flat[g.rows], g.keys_t)
            weights = delta_attention(base[i], delta_scores, None if scale is None else scale[g.rows])
            return torch.bmm(weights, g.keys, out=out)

        return self._assemble(product)


# ------------------------------------------------------------------------------------------- kernels
def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _attention_eager(const: torch.Tensor, partial: torch.Tensor, scale: torch.Tensor | None,
                     has_empty: bool) -> torch.Tensor:
    """softmax(const + partial·scale) in fp32 (or wider), result in partial's dtype; rows with no key give 0."""
    scores = partial.to(_wide(partial))
    if scale is not None:
        scores = scores * scale
    weights = torch.softmax(const.to(scores.dtype) + scores, dim=-1)
    return (weights.nan_to_num(0.0) if has_empty else weights).to(partial.dtype)


def _delta_attention_eager(attention: torch.Tensor, delta_scores: torch.Tensor,
                           scale: torch.Tensor | None) -> torch.Tensor:
    a = attention.to(_wide(attention))
    ds = delta_scores.to(_wide(attention))
    if scale is not None:
        ds = ds * scale
    z_star = a.sum(-1, keepdim=True).clamp_min_(1e-30)
    log_ratio = (torch.exp(ds) * a).sum(-1, keepdim=True).clamp_min_(1e-30).div_(z_star).log_()
    return ds.sub_(log_ratio).expm1_().mul_(a).div_(z_star).to(attention.dtype)


def _native_library(rows: torch.Tensor, other: torch.Tensor, other_dtype: torch.dtype,
                    scale: torch.Tensor | None) -> ctypes.CDLL | None:
    """The native kernels if they take these operands, else None: (n, Lq, U) bf16 `rows`, a same-shaped `other`
    of `other_dtype`, one fp32 factor per group row (or None), all contiguous on the CPU."""
    lib = native_kernels.library()
    fits = (lib is not None and rows.dtype == torch.bfloat16 and rows.dim() == 3 and other.dtype == other_dtype
            and other.shape == rows.shape
            and (scale is None or (scale.dtype == torch.float32 and scale.numel() == rows.shape[0]))
            and all(t is None or (t.device.type == "cpu" and t.is_contiguous()) for t in (rows, other, scale)))
    return lib if fits else None


def _attention_native(const: torch.Tensor, partial: torch.Tensor, scale: torch.Tensor | None,
                      has_empty: bool) -> torch.Tensor:
    """`_attention_eager` in one AVX-512 pass per row (native/softmax_avx512.c); other dtypes go to the eager one."""
    lib = _native_library(partial, const, torch.float32, scale)
    if lib is None:
        return _attention_eager(const, partial, scale, has_empty)
    out = torch.empty_like(partial)
    lib.seqep_attention(const.data_ptr(), partial.data_ptr(), None if scale is None else scale.data_ptr(),
                        *partial.shape, int(has_empty), out.data_ptr(), torch.get_num_threads())
    return out


def _delta_attention_native(attention: torch.Tensor, delta_scores: torch.Tensor,
                            scale: torch.Tensor | None) -> torch.Tensor:
    """`_delta_attention_eager` in one AVX-512 pass per row; other dtypes go to the eager one."""
    lib = _native_library(attention, delta_scores, torch.bfloat16, scale)
    if lib is None:
        return _delta_attention_eager(attention, delta_scores, scale)
    out = torch.empty_like(attention)
    lib.seqep_delta_attention(attention.data_ptr(), delta_scores.data_ptr(),
                              None if scale is None else scale.data_ptr(), *attention.shape, out.data_ptr(),
                              torch.get_num_threads())
    return out


_COMPILED: dict[str, object] = {}


def enable_compiled(enabled: bool = True) -> None:
    """Use fused, one-pass versions of the two softmax kernels: our AVX-512 ones where `native_kernels` loads
    (no inductor in the process: ~150 MB less resident memory, nothing to compile), else `torch.compile`d
    ones; see `phi.enable_compiled_kernels`."""
    if enabled and not _COMPILED:
        if native_kernels.library() is not None:
            _COMPILED["delta_attention"], _COMPILED["attention"] = _delta_attention_native, _attention_native
        else:
            _COMPILED["delta_attention"] = torch.compile(_delta_attention_eager, dynamic=True)
            _COMPILED["attention"] = torch.compile(_attention_eager, dynamic=True)
    elif not enabled:
        _COMPILED.clear()


@torch.no_grad()
def delta_attention(attention: torch.Tensor, delta_scores: torch.Tensor,
                    scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(S* + δS) − softmax(S*) from A* = softmax(S*) and δS (times `scale`, per row, if given), exactly,
    without cancellation.

    With z = Σ_u A*_u exp(δS_u) and z* = Σ_u A*_u (per row): softmax(S* + δS) = A* ⊙ exp(δS) / z, so
    the difference is (A*/z*) ⊙ expm1(δS − log(z/z*)): computed in fp32 from the small δS it is accurate
    relative to itself, however coarse A* (bf16) is, and exactly 0 at δS = 0 even though bf16 rows of A*
    do not sum to exactly 1. Rows whose keys are all masked (A* = 0) give 0, and so do padding columns
    (A* = 0 there). Compiled, it is one pass that costs what a softmax costs.
    """
    kernel = _COMPILED.get("delta_attention", _delta_attention_eager)
    return kernel(attention, delta_scores, scale)
