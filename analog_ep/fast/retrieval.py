"""The fast path's Hopfield retrieval, taken over each sequence's *distinct* keys only: exact, and cheaper.

A key that occurs c times in a sequence (a repeated word, or padding) gets the same score from every
query and returns the same value, so softmax over the L keys equals softmax over the U distinct ones
with log c added to their scores. Real reviews padded to 600 tokens hold ~137 distinct keys on average
(IMDB train, w2v:300, padding counted once), SNLI sentences padded to 25 about 11: the fast path's
(Lq × L) score matrices shrink to (Lq × U). Consecutive rows are grouped, each group padded to its own
largest U with zero keys of count 0 (score −∞), so that one long review need not pad the whole batch
(`_partition` picks the groups from a cost model). Inputs without repeats (random vectors) form one
group of all rows: the same products as a plain retrieval.

Where our native kernels load, each group's keys are packed once per batch for `native/retrieval_amx.c`,
which takes scores, softmax and values in one AMX pass per block of queries; rows whose projections read
the same keys (SNLI's four projections read two sentences) share one packed copy, and the nudged phases'
±β copies read it once for both (`PackedKeys`). Elsewhere: torch's batched products and softmax.

Rows are the flattened (B·P) retrievals of a batch (P projection layers). The exact path does not use
this module: it stays the plain L × L retrieval (`analog_ep.hopfield`), the oracle this one is tested
against.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from analog_ep.fast import native_kernels

# Cost model of one group of rows, in multiply-add equivalents: the two bmms take 2·Lq·d per row and key,
# the fused softmax ~350 per score element, and each group ~3e8 whatever its size (three kernel calls plus
# the compiled softmax's guards, and a cold start for each operand). GROUP_COST was set by measurement, not
# derived: at imdb-paper batch 32 on real reviews, splitting into 17 groups (23 % of the L × L scores kept)
# is no faster than one group (46 %), 3 groups (37 %) marginally the fastest (docs/history.md).
SOFTMAX_COST = 350
GROUP_COST = 3e8
MAX_CANDIDATES = 64  # group boundaries considered (rows are taken in blocks beyond this many)
_HASH_SEED = 20231115  # fixed random direction that tells distinct key vectors apart (checked exactly after)
_CHECK_ROWS = 64  # rows per block of that exact check
# The exact path (fp32/float64, no autograd through the steps) retrieves over distinct keys where that keeps at
# most this share of the score columns. On an AVX2 CPU: imdb-paper batch 32 keeps 0.37 (151 → 43 ms a retrieval,
# the same numbers to 1e-6), the imdb `cpu` preset 0.59 (padded reviews, one group: 1.82 → 0.82 ms, 16 ms to
# build per batch; 0.140 → 0.096 s a training batch); SNLI's `cpu` preset keeps all (a 25-word sentence pads
# its one group).
EXACT_MAX_KEPT = 0.75
EXACT_PROBE_ROWS = 2  # samples whose distinct keys are counted before the whole batch is deduplicated
# Groups with at most this many queries per row retrieve in fp32 through `native/retrieval_avx2.c` where the AVX2
# set loads: on an AVX2 CPU (experiments/avx2_kernels.py) 1.3-1.8× faster than torch's batched products and
# compiled softmax at 8-64 queries (the imdb `cpu` preset's shape: 0.94 → 0.71 ms), slower at 128 queries of d = 300
# (MKL's blocked products)
FUSED_MAX_QUERIES = 64


class Query(NamedTuple):
    """The per-step half of the projection layer's query, (B, P, Lq, d), and a per-sample factor (B, 1) it still
    has to be multiplied by, or None. The factor is the int8 product's dequantisation (`Int8Weight.
    down_row_scaled`): applied to the (Lq × U) scores inside the softmax kernel, it costs nothing, where a pass
    over the (Lq × d) query costs ~2-6 ms a step at IMDB's shape."""

    values: torch.Tensor
    row_scale: torch.Tensor | None = None
    changed: torch.Tensor | None = None  # (B,) bool: the samples whose query changed since the last retrieval


class PackedKeys(NamedTuple):
    """A group's keys laid out for `native/retrieval_amx.c`, once per distinct key set (`slot`): rows with the
    same keys (SNLI's projections that read the same sentence) share a slot. U padded to `up`, d to `dp`
    (multiples of 32)."""

    kt: torch.Tensor  # γ·Kᵀ as [dp/2][up][2] per slot
    kv: torch.Tensor  # K as [up/2][dp][2] per slot
    slot: torch.Tensor  # (n,) int64: the slot of each of the group's rows
    order: torch.Tensor  # (copies·n,) int64: the rows (copies stacked) sorted by slot, the kernel's order
    up: int
    dp: int

    @classmethod
    def build(cls, keys: torch.Tensor, keys_t: torch.Tensor, slot: torch.Tensor) -> PackedKeys:
        """From bf16 keys (slots, U, d) and γ·keysᵀ (slots, d, U), and each row's slot."""
        n, u, d = keys.shape
        up, dp = -(-u // 32) * 32, -(-d // 32) * 32
        kt = torch.empty(n, dp * up, dtype=torch.bfloat16)
        kv = torch.empty(n, up * dp, dtype=torch.bfloat16)
        native_kernels.library().seqep_pack_keys(keys.data_ptr(), keys_t.data_ptr(), n, u, d, up, dp, kt.data_ptr(),
                                                 kv.data_ptr(), torch.get_num_threads())
        return cls(kt, kv, slot, torch.argsort(slot, stable=True), up, dp)

    def copies(self, times: int) -> PackedKeys:
        """The same keys for `times` stacked copies of the group's rows (row r + c·n reads row r's slot)."""
        return self._replace(order=torch.argsort(self.slot.repeat(times), stable=True))


@dataclass
class KeyGroup:
    """Consecutive rows of the flattened batch whose distinct keys are stored together, padded to the group's
    largest count U: as torch operands (`keys`, `keys_t`), or packed for the native kernel (`packed`)."""

    rows: slice  # rows of the flattened (B·P) batch (with `packed`, possibly several stacked copies of them)
    width: int  # U
    keys: torch.Tensor | None  # (n, U, d) distinct keys (the values), low precision, zero past a row's count
    keys_t: torch.Tensor | None  # (n, d, U) γ·keysᵀ, low precision (the contiguous operand of the scores)
    const: torch.Tensor | None  # (n, Lq, U) fp32: γ·(X W₀ᵀ) keysᵀ + log(count), −inf on padding; free phase only
    has_empty: bool  # some row has no key at all (every key masked): its softmax row is NaN, read as zeros
    packed: PackedKeys | None = None


def _hash_direction(dim: int) -> torch.Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(_HASH_SEED), dtype=torch.float64)


def distinct_keys(keys: torch.Tensor, key_mask: torch.Tensor | None = None, with_slots: bool = False
                  ) -> tuple[torch.Tensor, ...]:
    """Per row of (N, L, d) keys: the distinct unmasked keys (N, L, d), their counts (N, L) and how many (N,);
    `with_slots` adds the distinct key each position holds (N, L), the slot its vector sits in.
    Softmax over them with log count added to the scores equals softmax over the L keys.

    Distinct vectors are told apart by a projection on a fixed random direction (float64) and the result
    is checked exactly; if two different keys ever collided the row set falls back to no merging (every
    position its own slot).
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
    distinct = _gather_rows(keys, source).mul_((counts > 0).unsqueeze(-1))
    position_slot = torch.empty_like(slot).scatter_(1, order, slot)
    for rows_ in range(0, n, _CHECK_ROWS):  # in blocks: a full-size rebuilt copy would set the batch's peak memory
        part = slice(rows_, rows_ + _CHECK_ROWS)
        rebuilt = _gather_rows(distinct[part], position_slot[part])
        if (rebuilt != keys[part]).logical_and_(valid[part].unsqueeze(-1)).any():  # a hash collision: keep every key
            counts = valid.to(keys.dtype)
            merged = (keys * valid.unsqueeze(-1), counts, valid.sum(-1))
            identity = torch.arange(length, device=keys.device).expand(n, length)
            return (*merged, identity) if with_slots else merged
    found = (distinct, counts, first.sum(-1))
    return (*found, position_slot) if with_slots else found


def _gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t[r, index[r, j]] for (n, L, d) t and (n, M) index, as (n, M, d): whole rows of d copied by one
    index_select (7.6× faster than `gather` with an index expanded over d at the imdb `cpu` shape, the same values)."""
    n, length, d = t.shape
    flat = (index + torch.arange(n, device=t.device).unsqueeze(1) * length).reshape(-1)
    return t.reshape(n * length, d).index_select(0, flat).view(n, index.shape[1], d)


def key_vocabulary(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct vectors among the valid rows of (n, d) keys, (V, d) with V ≥ 1, and the one each row holds
    (n,) (0 for invalid rows): a batch's word vocabulary, where each sentence's distinct keys share words."""
    distinct, _, _, slots = distinct_keys(keys.unsqueeze(0), valid.unsqueeze(0), with_slots=True)
    slots = slots[0].masked_fill(~valid, 0)
    return distinct[0, :int(slots.max()) + 1], slots


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
    sizes = distinct_keys(keys.reshape(-1, length, dim), None if key_mask is None else key_mask.reshape(-1, length))[2]
    sizes = sizes.tolist()
    return _kept_share(_partition(sizes, query_len or length, dim), sizes, length)


def _kept_share(groups: list[slice], sizes: list[int], length: int) -> float:
    """Σ_groups n·U / (N·L): the score columns grouped rows padded to their group's largest count U compute."""
    return sum((g.stop - g.start) * max(max(sizes[g]), 1) for g in groups) / (len(sizes) * length)


class DistinctKeys:
    """The keys of a batch's retrievals, deduplicated and grouped, with the retrieval's three kernels."""

    def __init__(self, groups: list[KeyGroup], shape: tuple[int, int, int, int], seq_len: int,
                 dtype: torch.dtype) -> None:
        self.groups = groups
        self.shape = shape  # (B, P, Lq, d) of the queries and of the retrieved state
        self.seq_len = seq_len  # L: keys per row before deduplication
        self.dtype = dtype  # of the keys, the weights and the retrieved state
        self._last_absmax: tuple[int, int, tuple[int, ...], torch.Tensor] | None = None  # see `row_absmax`

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def device(self) -> torch.device:
        g = self.groups[0]
        return g.packed.kt.device if g.packed is not None else g.keys.device

    @classmethod
    def build(cls, keys: torch.Tensor, key_mask: torch.Tensor | None, query_drive: torch.Tensor | None,
              gamma: float, dtype: torch.dtype, query_len: int | None = None, max_kept: float = 1.0
              ) -> DistinctKeys | None:
        """keys (B, P, L, d) in the parameters' dtype, key_mask (B, P, L) (True = real) or None, query_drive
        (B, P, Lq, d): X W₀ᵀ, or the learned queries when pooling. Without a query drive (`query_len` queries),
        the constant is the log counts alone and `retrieve` takes the whole drive. None where the groups would
        keep more than `max_kept` of the score columns (decided before any group is built)."""
        batch, proj, seq_len, dim = keys.shape
        mask = None if key_mask is None else key_mask.reshape(-1, seq_len)
        distinct, counts, sizes = distinct_keys(keys.reshape(-1, seq_len, dim), mask)
        if query_drive is not None:
            query_len = query_drive.shape[2]
            query_drive = query_drive.reshape(-1, query_len, dim)
        log_counts = counts.log()  # log 0 = −inf: padding columns and masked keys take no weight
        sizes_list = sizes.tolist()
        partition = _partition(sizes_list, query_len, dim)
        if _kept_share(partition, sizes_list, seq_len) > max_kept:
            return None
        native = _native_enabled(dtype, keys.device)
        same_as = _same_key_rows(keys, key_mask) if native else None
        groups = []
        for rows in partition:
            width = max(max(sizes_list[rows]), 1)
            k = distinct[rows, :width].contiguous()
            # one fp32 temporary, not two; a copy even when the transposed view counts as contiguous (U or d = 1)
            scaled_t = k.transpose(-1, -2).clone(memory_format=torch.contiguous_format).mul_(gamma)
            # kept in fp32: these logits are large, their rounding is not
            const = log_counts[rows, :width].unsqueeze(1).contiguous()  # read at every step: one layout, once
            if query_drive is not None:
                const = torch.matmul(query_drive[rows], scaled_t).add_(const)
            has_empty = min(sizes_list[rows]) == 0
            if same_as is None:
                groups.append(KeyGroup(rows, width, k.to(dtype), scaled_t.to(dtype), const, has_empty))
                continue
            first = same_as[rows]  # the group's first row with the same keys (itself if none, or outside the group)
            first = torch.where(first >= rows.start, first, torch.arange(rows.start, rows.stop)) - rows.start
            slots, slot = torch.unique(first, return_inverse=True)
            packed = PackedKeys.build(k[slots].to(dtype), scaled_t[slots].to(dtype), slot)
            groups.append(KeyGroup(rows, width, None, None, const, has_empty, packed))
        return cls(groups, (batch, proj, query_len, dim), seq_len, dtype)

    @property
    def kept_fraction(self) -> float:
        """Score columns computed over those of a plain retrieval: Σ_groups n·U / (N·L)."""
        kept = sum((g.rows.stop - g.rows.start) * g.width for g in self.groups)
        return kept / (self.rows * self.seq_len)

    def repeat(self, times: int, constants: bool = True) -> DistinctKeys:
        """The same keys for the batch stacked `times` (the ±β phases: the free phase's `const` is not needed
        there, `constants=False` leaves it out). Groups are shared, not copied: copy r of group g reads the
        same tensors at rows shifted by r·N. One packed group of all rows becomes one group of all copies:
        the native kernel then reads each key set once for every copy."""
        n = self.rows
        shape = (self.shape[0] * times, *self.shape[1:])
        if len(self.groups) == 1 and self.groups[0].packed is not None:
            g = self.groups[0]
            merged = replace(g, rows=slice(0, n * times), const=g.const if constants else None,
                             packed=g.packed.copies(times))
            return DistinctKeys([merged], shape, self.seq_len, self.dtype)
        groups = [replace(g, rows=slice(g.rows.start + r * n, g.rows.stop + r * n),
                          const=g.const if constants else None)
                  for r in range(times) for g in self.groups]
        return DistinctKeys(groups, shape, self.seq_len, self.dtype)

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

    def _assemble(self, product: Callable[[int, torch.Tensor | None, torch.Tensor | None], torch.Tensor]
                  ) -> torch.Tensor:
        """(B, P, Lq, d) from `product(i, out, absmax)` of each group i, written straight into its rows. Where
        every group runs natively, the kernel also reports max |out| per block of queries (`absmax` rows), kept
        per sample for `row_absmax`."""
        blocks = -(-self.shape[2] // 32)
        absmax = (torch.empty(self.rows, blocks, dtype=torch.float32)
                  if all(g.packed is not None for g in self.groups) else None)
        if len(self.groups) == 1:
            out = product(0, None, absmax).view(self.shape)
        else:
            out = torch.empty(self.rows, *self.shape[2:], dtype=self.dtype, device=self.device)
            for i, g in enumerate(self.groups):
                product(i, out[g.rows], None if absmax is None else absmax[g.rows])
            out = out.view(self.shape)
        self._last_absmax = None if absmax is None else (
            out.data_ptr(), out._version, tuple(out.shape), absmax.view(self.shape[0], -1).amax(1))
        return out

    def row_absmax(self, state: torch.Tensor) -> torch.Tensor | None:
        """max |state| per sample (B,) if `state` is this object's latest retrieval, untouched since, else None."""
        last = self._last_absmax
        if last is None or (state.data_ptr(), state._version, tuple(state.shape)) != last[:3]:
            return None
        return last[3]

    def attention(self, top_down: Query) -> list[torch.Tensor]:
        """Free phase: softmax(γ (X W₀ᵀ + top_down) Kᵀ + log count), per group, from top_down (B, P, Lq, d)."""
        kernel = _COMPILED.get("attention", _attention_eager)
        flat, scale = self._flat(top_down)
        weights = []
        for g in self.groups:
            g_scale = None if scale is None else scale[g.rows]
            if g.packed is not None:
                weights.append(_retrieve_native(g, flat[g.rows], g_scale, None, want_weights=True)[0])
            else:
                weights.append(kernel(g.const, torch.bmm(flat[g.rows], g.keys_t), g_scale, g.has_empty))
        return weights

    @classmethod
    def for_exact_path(cls, keys: torch.Tensor, key_mask: torch.Tensor | None, gamma: float, query_len: int
                       ) -> DistinctKeys | None:
        """The exact path's retrieval over distinct keys (in the keys' dtype; `retrieve` takes the whole drive),
        where it keeps at most `EXACT_MAX_KEPT` of the score columns, on the CPU (on a GPU the groups' extra
        kernel launches cost more than the columns they save); else None."""
        if keys.device.type != "cpu":
            return None
        # a look at the first few sequences first: where most keys differ (n-gram slots, random vectors) the whole
        # batch's deduplication would cost more than its retrievals save
        batch, proj, length, dim = keys.shape
        few = keys[:EXACT_PROBE_ROWS].reshape(-1, length, dim)
        few_mask = None if key_mask is None else key_mask[:EXACT_PROBE_ROWS].reshape(-1, length)
        if float(distinct_keys(few, few_mask)[2].float().mean()) > EXACT_MAX_KEPT * length:
            return None
        return cls.build(keys, key_mask, None, gamma, keys.dtype, query_len=query_len, max_kept=EXACT_MAX_KEPT)

    def retrieve_drive(self, drive: torch.Tensor) -> torch.Tensor:
        """The exact path's retrieval from its whole drive (B, P, Lq, d) (`for_exact_path`)."""
        return self.retrieve(Query(drive))

    def retrieve(self, top_down: Query, previous: torch.Tensor | None = None) -> torch.Tensor:
        """One free-phase retrieval: the projection layer's new state (B, P, Lq, d). With `previous` (the last
        retrieval's result) and `top_down.changed`, only the changed samples retrieve (`_changed_only`)."""
        kernel = _COMPILED.get("attention", _attention_eager)
        flat, scale = self._flat(top_down)

        def one(g: KeyGroup, q: torch.Tensor, g_scale: torch.Tensor | None, out: torch.Tensor | None,
                absmax: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
            if g.packed is not None:
                return _retrieve_native(g, q, g_scale, None, out=out, absmax=absmax)[1]
            if "fp32" in _COMPILED and _fused_fp32_pays(g, q):
                return _retrieve_fp32(g, q, g_scale, out)
            weights = kernel(g.const, torch.bmm(q, g.keys_t), g_scale, g.has_empty)
            return torch.bmm(weights, g.keys, out=out)

        return self._run(one, flat, scale, top_down.changed, previous, None)

    def delta_retrieve(self, base: list[torch.Tensor], delta_q: Query, previous: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """Nudged phases: s(Q* + δQ) − s(Q*) from A* = `base` (per group) and δQ (B, P, Lq, d), without
        cancellation (`delta_attention`); `previous` as in `retrieve`."""
        flat, scale = self._flat(delta_q)

        def one(g: KeyGroup, q: torch.Tensor, g_scale: torch.Tensor | None, out: torch.Tensor | None,
                absmax: torch.Tensor | None, base: torch.Tensor | None) -> torch.Tensor:
            if g.packed is not None:
                return _retrieve_native(g, q, g_scale, base, out=out, absmax=absmax)[1]
            weights = delta_attention(base, torch.bmm(q, g.keys_t), g_scale)
            return torch.bmm(weights, g.keys, out=out)

        return self._run(one, flat, scale, delta_q.changed, previous, base)

    def _run(self, one: Callable[..., torch.Tensor], flat: torch.Tensor, scale: torch.Tensor | None,
             changed: torch.Tensor | None, previous: torch.Tensor | None, base: list[torch.Tensor] | None
             ) -> torch.Tensor:
        """Every group's retrieval `one(group, queries, scale, out, absmax, base)`, or the changed samples' only."""
        if (changed is not None and previous is not None and tuple(previous.shape) == self.shape
                and all(g.packed is None for g in self.groups)):
            return self._changed_only(one, flat, scale, changed, previous, base)

        def product(i: int, out: torch.Tensor | None, absmax: torch.Tensor | None) -> torch.Tensor:
            g = self.groups[i]
            return one(g, flat[g.rows], None if scale is None else scale[g.rows], out, absmax,
                       None if base is None else base[i])

        return self._assemble(product)

    def _changed_only(self, one: Callable[..., torch.Tensor], flat: torch.Tensor, scale: torch.Tensor | None,
                      changed: torch.Tensor, previous: torch.Tensor, base: list[torch.Tensor] | None
                      ) -> torch.Tensor:
        """`previous` with the rows of the `changed` samples retrieved anew: a sample whose query did not change
        retrieves what it retrieved last time (the int8 change products say which: `delta_int8`)."""
        out = previous.reshape(self.rows, *self.shape[2:]).clone()
        rows = changed.repeat_interleave(self.shape[1])  # per sample → per (sample, projection) row
        for i, g in enumerate(self.groups):
            idx = rows[g.rows].nonzero().flatten()
            if not idx.numel():
                continue
            sub = replace(g, keys=g.keys.index_select(0, idx), keys_t=g.keys_t.index_select(0, idx),
                          const=None if g.const is None else g.const.index_select(0, idx))
            q = flat[g.rows].index_select(0, idx)
            g_scale = None if scale is None else scale[g.rows].index_select(0, idx)
            g_base = None if base is None else base[i].index_select(0, idx)
            out.index_copy_(0, idx + g.rows.start, one(sub, q, g_scale, None, None, g_base))
        self._last_absmax = None
        return out.view(self.shape)


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


def _fused_fp32_pays(group: KeyGroup, queries: torch.Tensor) -> bool:
    """Whether `_retrieve_fp32` takes this group: fp32 CPU operands (float64 stays with torch) and at most
    FUSED_MAX_QUERIES queries per row, where it beats MKL's batched products and the compiled softmax."""
    return (queries.shape[1] <= FUSED_MAX_QUERIES and queries.dtype == torch.float32 and queries.device.type == "cpu"
            and group.keys.dtype == torch.float32 and group.const.dtype == torch.float32)


def _retrieve_fp32(group: KeyGroup, q: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor | None
                   ) -> torch.Tensor:
    """One group's retrieval (n, Lq, d) in one pass per block of queries (`native/retrieval_avx2.c`): what
    `_attention_eager` and the values' bmm give, to fp32 rounding. Written into `out` where given."""
    n, lq, d = q.shape
    const = group.const
    if const.shape[0] != n or const.shape[1] not in (1, lq) or const.shape[2] != group.width:
        raise ValueError(f"retrieval: constant of shape {tuple(const.shape)} for {n} rows, {lq} queries and "
                         f"{group.width} keys")
    q = q.contiguous()  # the group's keys and constant are built contiguous (`DistinctKeys.build`)
    target = out if out is not None and out.is_contiguous() else torch.empty(n, lq, d, dtype=torch.float32)
    factors = None if scale is None else scale.reshape(n).to(torch.float32).contiguous()
    native_kernels.library(native_kernels.AVX2).seqep_retrieve_f32(
        q.data_ptr(), group.keys_t.data_ptr(), group.keys.data_ptr(), const.data_ptr(), const.shape[1],
        None if factors is None else factors.data_ptr(), n, lq, d, group.width, target.data_ptr(),
        torch.get_num_threads())
    if out is not None and target is not out:
        return out.copy_(target)
    return target


def _native_enabled(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether new key groups are packed for `native/retrieval_amx.c`: bf16 keys on the CPU, the library loaded
    and the fused kernels switched on (`enable_compiled(False)` keeps the torch retrieval, the tests' oracle)."""
    return "native" in _COMPILED and dtype == torch.bfloat16 and device.type == "cpu"


def _same_key_rows(keys: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """(B·P,) int64: for each flattened row, the first row of the same sample whose projection reads the same
    keys (SNLI: each sentence is the keys of two of the four projections), else the row itself."""
    batch, proj = keys.shape[:2]
    first = list(range(proj))
    for p in range(proj):
        for earlier in range(p):
            if first[earlier] == earlier and torch.equal(keys[:, earlier], keys[:, p]) and (
                    key_mask is None or torch.equal(key_mask[:, earlier], key_mask[:, p])):
                first[p] = earlier
                break
    return (torch.arange(batch).unsqueeze(1) * proj + torch.tensor(first)).reshape(-1)


def _retrieve_native(group: KeyGroup, q: torch.Tensor, scale: torch.Tensor | None, base: torch.Tensor | None,
                     want_weights: bool = False, out: torch.Tensor | None = None, absmax: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(weights if asked, retrieved values unless only weights are asked) of one packed group in one native
    pass: softmax(const + q·γKᵀ·scale), or with `base` = A* the nudged phases' δ-softmax; then · K. `absmax`
    (n, ceil(Lq / 32)) fp32, contiguous, if given: max |values| per block of queries."""
    pk = group.packed
    q = q.to(torch.bfloat16).contiguous()
    n, lq, d = q.shape
    u = group.width
    weights = torch.empty(n, lq, u, dtype=torch.bfloat16) if want_weights else None
    if out is None and not want_weights:
        out = torch.empty(n, lq, d, dtype=torch.bfloat16)
    if scale is not None:
        scale = scale.reshape(n).to(torch.float32).contiguous()
    if base is not None:
        base = base.to(torch.bfloat16).contiguous()
    const = None if base is not None else group.const

    def ptr(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    native_kernels.library().seqep_retrieve(
        ptr(q), ptr(pk.kt), ptr(pk.kv), ptr(pk.slot), ptr(pk.order), ptr(const), ptr(base), ptr(scale), n,
        pk.slot.numel(), lq, d, u, pk.up, pk.dp, int(group.has_empty), ptr(weights),
        None if want_weights else ptr(out), None if want_weights else ptr(absmax), torch.get_num_threads())
    return weights, None if want_weights else out


_COMPILED: dict[str, object] = {}


def enable_compiled(enabled: bool = True) -> None:
    """Fused kernels for the retrieval: where `native_kernels` loads, the whole retrieval in one AMX pass per
    block of queries (`_retrieve_native`: no inductor in the process, ~150 MB less resident memory, nothing to
    compile), else `torch.compile`d one-pass softmax kernels; see `lowp_phi.enable_compiled_kernels`. Takes effect
    for keys built afterwards (`DistinctKeys.build` packs them for the native kernel). Where the AVX2 set loads,
    fp32 groups with at most FUSED_MAX_QUERIES queries (the exact path's pooled queries and sentences) retrieve in
    one pass too (`_retrieve_fp32`)."""
    if enabled and not _COMPILED:
        if native_kernels.library() is not None:
            _COMPILED["native"] = True  # `DistinctKeys.build` packs bf16 keys for `_retrieve_native`
        else:
            _COMPILED["delta_attention"] = torch.compile(_delta_attention_eager, dynamic=True)
            _COMPILED["attention"] = torch.compile(_attention_eager, dynamic=True)
        enable_fused_fp32()
    elif not enabled:
        _COMPILED.clear()


def enable_fused_fp32(enabled: bool = True) -> bool:
    """The fused fp32 retrieval alone (`_retrieve_fp32`: our AVX2 kernel, nothing to compile), for the exact path's
    runs, which do not turn on the fast path's compiled kernels; True where it is on."""
    if not enabled:
        _COMPILED.pop("fp32", None)
    elif native_kernels.library(native_kernels.AVX2) is not None:
        _COMPILED["fp32"] = True
    return "fp32" in _COMPILED


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
