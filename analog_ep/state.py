"""What a relaxation reads and updates: the per-batch `Inputs` and the `State` of every layer.

State layout used everywhere: a list of tensors, `[proj (B,P,L,d)]` (only if the graph has projection
layers) followed by the fully connected layers `(B, n_k)`; the last one is the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

State = list[torch.Tensor]


@dataclass
class Inputs:
    """Per-batch constants of the relaxation: computed once, reused at every step.

    `query_drive` (= X W₀ᵀ, the bottom-up half of ∂Φ/∂sᵖ) does not depend on the state, so it is
    computed once per batch instead of once per step. On the fast path (`lowp` set) the fp32 `keys` and
    `query_drive` are dropped once `lowp` holds what the steps read (memory), and the nudged phases' inputs
    keep `x_query` once per sample: `rows` then says how many rows the relaxation runs.
    """

    x_query: torch.Tensor | None  # (B,S,L,d) the input tokens; projection p reads stream query_streams[p]
    keys: torch.Tensor | None  # (B,P,L,d) Hopfield stored patterns (= values)
    key_mask: torch.Tensor | None  # (B,P,L) True = real token, only when masking padding
    query_drive: torch.Tensor | None  # (B,P,L,d), or (B,P,m,d) learned queries when pooling
    flat_x: torch.Tensor | None  # (B, S·L·d) for graphs without projection layers
    lowp: Any = None  # the fast path's operands (`analog_ep.fast.lowp_phi.LowPrecision`); None: exact path
    rows: int | None = None  # rows of the relaxation's states, where the tensors above do not say it
    query_streams: tuple[int, ...] = ()  # the stream each projection's queries come from (() without them)
    ids: torch.Tensor | None = None  # (B,S,L) token ids, when the net looks its word vectors up itself
    folded: Any = None  # the first synapse folded onto the keys (`analog_ep.fast.folded.FoldedKeys`), or None
    distinct: Any = None  # the exact path's keys deduplicated for its retrieval (`fast.retrieval.DistinctKeys`)

    @property
    def streams_in_order(self) -> bool:
        """Projection p reads stream p: `x_query` is already the (B,P,L,d) tokens, no gather needed."""
        return list(self.query_streams) == list(range(self.x_query.shape[1]))

    def query_tokens(self) -> torch.Tensor:
        """(B,P,L,d): the tokens each projection reads, gathered (a copy unless `streams_in_order`).
        Kept ungathered in `x_query`: SNLI's four projections read two streams, and a gathered copy held for
        the batch would add 30 MB to the fast path's peak."""
        return self.x_query if self.streams_in_order else self.x_query[:, list(self.query_streams)]

    @property
    def batch_size(self) -> int:
        if self.rows is not None:  # always set with `lowp`
            return self.rows
        t = self.keys if self.keys is not None else self.flat_x
        return t.shape[0]

    def repeat(self, times: int) -> Inputs:
        """The same inputs stacked `times` along the batch (for batched ±β phases)."""

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        tensors = (self.x_query, self.keys, self.key_mask, self.query_drive, self.flat_x)
        return Inputs(*(rep(t) for t in tensors), lowp=None if self.lowp is None else self.lowp.repeat(times),
                      rows=None if self.rows is None else self.rows * times, query_streams=self.query_streams,
                      ids=rep(self.ids), folded=self.folded,
                      distinct=None if self.distinct is None else self.distinct.repeat(times))
