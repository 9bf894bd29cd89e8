"""The fast path's Hopfield retrieval, taken over each sequence's *distinct* keys only: exact, and cheaper.

A key that occurs c times in a sequence (a repeated word, or padding) gets the same score from every
query and returns the same value, so softmax over the L keys equals softmax over the U distinct ones
with log c added to their scores. Real reviews padded to 600 tokens hold ~137 distinct keys on average
(IMDB train, w2v:300, padding counted once), SNLI sentences padded to 25 about 11: the fast path's
(Lq × L) score matrices shrink to (Lq × U). Sequences are bucketed by U (sorted, then split into
equal-count groups, each padded to its own largest U with zero keys of count 0, score −∞), so one long
review does not pad the whole batch. Inputs without repeats (random vectors) form one group of all
rows in batch order: the same products as a plain retrieval.

Rows are the flattened (B·P) retrievals of a batch (P projection layers). The exact path does not use
this module: it stays the plain L × L retrieval (`analog_ep.hopfield`), the oracle this one is tested
against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_GROUPS = 8  # buckets of rows by distinct-key count (IMDB batch 32: padded U ~150 for 8 vs 289 for 1)
_HASH_SEED = 20231115  # fixed random direction that tells distinct key vectors apart (checked exactly after)


@dataclass
class KeyGroup:
    """Rows of the flattened batch whose distinct keys are stored together, padded to the group's largest U."""

    index: torch.Tensor | None  # (n,) rows of the flattened batch; None: all rows, in order
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
    code = keys.to(torch.float64) @ _hash_direction(d).to(keys.device)
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
    distinct = keys.gather(1, source.unsqueeze(-1).expand(-1, -1, d)) * (counts > 0).unsqueeze(-1)
    position_slot = torch.empty_like(slot).scatter_(1, order, slot)
    rebuilt = distinct.gather(1, position_slot.unsqueeze(-1).expand(-1, -1, d))
    if not torch.equal(rebuilt[valid], keys[valid]):  # a hash collision: keep every key (still exact)
        counts = valid.to(keys.dtype)
        return keys * valid.unsqueeze(-1), counts, valid.sum(-1)
    return distinct, counts, first.sum(-1)


def _bucket(sizes: torch.Tensor, max_groups: int) -> list[torch.Tensor | None]:
    """Rows split into ≤ max_groups groups of similar size (sorted by size, equal counts); neighbours with
    the same largest size are merged. One group of every row comes back as [None] (batch order, no copies)."""
    order = sizes.argsort(stable=True)
    chunks = [c for c in order.chunk(max_groups) if len(c)]
    merged: list[torch.Tensor] = []
    for c in chunks:
        if merged and int(sizes[merged[-1]].max()) == int(sizes[c].max()):
            merged[-1] = torch.cat([merged[-1], c])
        else:
            merged.append(c)
    return [None] if len(merged) == 1 else merged


def kept_fraction(keys: torch.Tensor, key_mask: torch.Tensor | None = None, max_groups: int = MAX_GROUPS) -> float:
    """Score columns the fast path computes for (B, P, L, d) keys, over the L of a plain retrieval."""
    length = keys.shape[-2]
    sizes = _distinct(keys.reshape(-1, length, keys.shape[-1]),
                      None if key_mask is None else key_mask.reshape(-1, length))[2]
    kept = sum(len(sizes) * max(int(sizes.max()), 1) if index is None else len(index) * max(int(sizes[index].max()), 1)
               for index in _bucket(sizes, max_groups))
    return kept / (len(sizes) * length)


class DistinctKeys:
    """The keys of a batch's retrievals, deduplicated and bucketed, with the retrieval's three kernels."""

    def __init__(self, groups: list[KeyGroup], shape: tuple[int, int, int, int], seq_len: int) -> None:
        self.groups = groups
        self.shape = shape  # (B, P, Lq, d) of the queries and of the retrieved state
        self.seq_len = seq_len  # L: keys per row before deduplication

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def rows(self) -> int:
        return self.shape[0] * self.shape[1]

    @classmethod
    def build(cls, keys: torch.Tensor, key_mask: torch.Tensor | None, query_drive: torch.Tensor,
              gamma: float, dtype: torch.dtype, max_groups: int = MAX_GROUPS) -> DistinctKeys:
        """keys (B, P, L, d) in the parameters' dtype, key_mask (B, P, L) (True = real) or None, query_drive
        (B, P, Lq, d): X W₀ᵀ, or the learned queries when pooling."""
        batch, proj, seq_len, dim = keys.shape
        mask = None if key_mask is None else key_mask.reshape(-1, seq_len)
        distinct, counts, sizes = _distinct(keys.reshape(-1, seq_len, dim), mask)
        query_len = query_drive.shape[2]
        query_drive = query_drive.reshape(-1, query_len, dim)
        log_counts = counts.log()  # log 0 = −inf: padding columns and masked keys take no weight
        groups = []
        for index in _bucket(sizes, max_groups):
            def take(t: torch.Tensor, index: torch.Tensor | None = index) -> torch.Tensor:
                return t if index is None else t.index_select(0, index)
            width = max(int(take(sizes).max()), 1)
            k = take(distinct[:, :width])
            scaled_t = (k * gamma).transpose(-1, -2).contiguous()
            # kept in fp32: these logits are large, their rounding is not
            const = torch.matmul(take(query_drive), scaled_t).add_(take(log_counts[:, :width]).unsqueeze(1))
            has_empty = bool(take(sizes).min() == 0)
            groups.append(KeyGroup(index, k.to(dtype), scaled_t.to(dtype), const, has_empty))
        return cls(groups, (batch, proj, query_len, dim), seq_len)

    @property
    def kept_fraction(self) -> float:
        """Score columns computed over those of a plain retrieval: Σ_groups n·U / (N·L)."""
        kept = sum((self.rows if g.index is None else len(g.index)) * g.keys.shape[1] for g in self.groups)
        return kept / (self.rows * self.seq_len)

    def repeat(self, times: int, constants: bool = True) -> DistinctKeys:
        """The same keys for the batch stacked `times` (the ±β phases: the free phase's `const` is not needed
        there, `constants=False` leaves it out)."""
        groups = []
        for g in self.groups:
            index = None if g.index is None else torch.cat([g.index + r * self.rows for r in range(times)])
            const = torch.cat([g.const] * times) if constants and g.const is not None else None
            groups.append(KeyGroup(index, torch.cat([g.keys] * times), torch.cat([g.keys_t] * times), const,
                                   g.has_empty))
        return DistinctKeys(groups, (self.batch * times, *self.shape[1:]), self.seq_len)

    @staticmethod
    def repeat_weights(weights: list[torch.Tensor], times: int) -> list[torch.Tensor]:
        """Per-group attention weights for the batch stacked `times`, in `repeat`'s row order."""
        return [torch.cat([w] * times) for w in weights]

    def _rows(self, queries: torch.Tensor, g: KeyGroup) -> torch.Tensor:
        """The group's rows of (B, P, Lq, d) queries as (n, Lq, d)."""
        flat = queries.reshape(self.rows, *self.shape[2:])
        return flat if g.index is None else flat.index_select(0, g.index)

    def _assemble(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-group (n, Lq, d) results back in batch order, (B, P, Lq, d)."""
        if self.groups[0].index is None:
            return parts[0].view(self.shape)
        out = torch.empty(self.rows, *self.shape[2:], dtype=parts[0].dtype, device=parts[0].device)
        for g, part in zip(self.groups, parts):
            out.index_copy_(0, g.index, part)
        return out.view(self.shape)

    def attention(self, top_down: torch.Tensor) -> list[torch.Tensor]:
        """Free phase: softmax(γ (X W₀ᵀ + top_down) Kᵀ + log count), per group, from top_down (B, P, Lq, d)."""
        kernel = _COMPILED.get("attention", _attention_eager)
        return [kernel(g.const, torch.bmm(self._rows(top_down, g), g.keys_t), g.has_empty) for g in self.groups]

    def values(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """Σ_u weight_u · key_u: the retrieved state (B, P, Lq, d)."""
        return self._assemble([torch.bmm(w, g.keys) for w, g in zip(weights, self.groups)])

    def retrieve(self, top_down: torch.Tensor) -> torch.Tensor:
        """One free-phase retrieval: the projection layer's new state (B, P, Lq, d)."""
        return self.values(self.attention(top_down))

    def delta_retrieve(self, base: list[torch.Tensor], delta_q: torch.Tensor) -> torch.Tensor:
        """Nudged phases: s(Q* + δQ) − s(Q*) from A* = `base` (per group) and δQ (B, P, Lq, d), without
        cancellation (`delta_attention`)."""
        parts = []
        for a, g in zip(base, self.groups):
            delta_scores = torch.bmm(self._rows(delta_q, g), g.keys_t)
            parts.append(torch.bmm(delta_attention(a, delta_scores), g.keys))
        return self._assemble(parts)


# ------------------------------------------------------------------------------------------- kernels
def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _attention_eager(const: torch.Tensor, partial: torch.Tensor, has_empty: bool) -> torch.Tensor:
    """softmax(const + partial) in fp32 (or wider), result in partial's dtype; rows with no key give zeros."""
    weights = torch.softmax(const.to(_wide(partial)) + partial.to(_wide(partial)), dim=-1)
    return (weights.nan_to_num(0.0) if has_empty else weights).to(partial.dtype)


def _delta_attention_eager(attention: torch.Tensor, delta_scores: torch.Tensor) -> torch.Tensor:
    a = attention.to(_wide(attention))
    ds = delta_scores.to(_wide(attention))
    z_star = a.sum(-1, keepdim=True).clamp_min_(1e-30)
    log_ratio = (torch.exp(ds) * a).sum(-1, keepdim=True).clamp_min_(1e-30).div_(z_star).log_()
    return ds.sub_(log_ratio).expm1_().mul_(a).div_(z_star).to(attention.dtype)


_COMPILED: dict[str, object] = {}


def enable_compiled(enabled: bool = True) -> None:
    """Use `torch.compile`d (fused, one pass) versions of the two softmax kernels; see
    `phi.enable_compiled_kernels`."""
    if enabled and not _COMPILED:
        _COMPILED["delta_attention"] = torch.compile(_delta_attention_eager, dynamic=True)
        _COMPILED["attention"] = torch.compile(_attention_eager, dynamic=True)
    elif not enabled:
        _COMPILED.clear()


@torch.no_grad()
def delta_attention(attention: torch.Tensor, delta_scores: torch.Tensor) -> torch.Tensor:
    """softmax(S* + δS) − softmax(S*) from A* = softmax(S*) and δS, exactly, without cancellation.

    With z = Σ_u A*_u exp(δS_u) and z* = Σ_u A*_u (per row): softmax(S* + δS) = A* ⊙ exp(δS) / z, so
    the difference is (A*/z*) ⊙ expm1(δS − log(z/z*)): computed in fp32 from the small δS it is accurate
    relative to itself, however coarse A* (bf16) is, and exactly 0 at δS = 0 even though bf16 rows of A*
    do not sum to exactly 1. Rows whose keys are all masked (A* = 0) give 0, and so do padding columns
    (A* = 0 there). Compiled, it is one pass that costs what a softmax costs.
    """
    kernel = _COMPILED.get("delta_attention", _delta_attention_eager)
    return kernel(attention, delta_scores)
