"""The in-memory result: token-id datasets and one frozen embedding matrix (looked up per batch, `embed_batch`).

Sequences are stored as int32 ids (N, S, L), never as floats: IMDB at L=600 with 300-d vectors would be
18 GB as floats but is 60 MB as ids. The model embeds one batch at a time with ``embed_batch``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from analog_ep.embedding import PAD_ID, embed_batch, exact_match_flags  # noqa: F401  (the pipeline's public lookup)


class SequenceDataset(Dataset):
    """Token ids ``(N, S, L)`` int32 (S streams: 1 for IMDB, 2 for SNLI premise/hypothesis) and labels
    ``(N,)`` int64. Tokens are left-aligned, then PAD_ID (0). Works with a plain ``DataLoader`` and with
    ``DistributedSampler``: ``__getitem__`` returns ``(ids[i], labels[i])``.
    """

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, name: str = "") -> None:
        if ids.dim() != 3 or ids.dtype != torch.int32:
            raise ValueError(f"ids must be an int32 tensor (N, S, L), got {ids.dtype} {tuple(ids.shape)}")
        if labels.shape != (ids.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 of shape ({ids.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )
        self.ids, self.labels, self.name = ids, labels, name

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ids[i], self.labels[i]

    @property
    def num_streams(self) -> int:
        return self.ids.shape[1]

    @property
    def max_len(self) -> int:
        return self.ids.shape[2]

    @property
    def lengths(self) -> torch.Tensor:
        """Tokens per sequence after truncation, (N, S) int64; the mask is ``ids != 0``."""
        return (self.ids != PAD_ID).sum(dim=-1)

    def __repr__(self) -> str:
        return f"SequenceDataset({self.name!r}, N={len(self)}, S={self.num_streams}, L={self.max_len})"


@dataclass
class TaskData:
    """Everything a trainer needs for one task. ``info`` is JSON-serialisable (see docs/data.md)."""

    name: str
    train: SequenceDataset
    val: SequenceDataset
    test: SequenceDataset
    embedding: torch.Tensor  # (V, d) float32, frozen; row 0 = PAD and row 1 = UNK are zeros
    num_classes: int
    class_names: list[str]
    num_streams: int
    max_len: int
    info: dict[str, Any] = field(default_factory=dict)
    vocab: list[str] = field(default_factory=list)  # id -> word; vocab[0] = "<pad>", vocab[1] = "<unk>"

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def splits(self) -> dict[str, SequenceDataset]:
        return {"train": self.train, "val": self.val, "test": self.test}
