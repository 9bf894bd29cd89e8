"""Tokens -> ids: interning, the training-split vocabulary, and padding/truncation to L.

Texts are tokenised once into compact int32 arrays of *provisional* ids (one per distinct token seen in
any split). The vocabulary is then chosen from training-split counts only, and one lookup table maps
provisional ids to final ids, so no split ever holds millions of Python token strings (IMDB is 13M
tokens) and no token seen only in val/test can enter the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from analog_ep.embedding import PAD_ID as PAD_ID  # the ids this module hands out (re-exported)

UNK_ID = 1
PAD, UNK = "<pad>", "<unk>"
DROP = -1  # lookup-table value for an OOV token under oov="drop"


class Interner:
    """Provisional ids in order of first appearance (deterministic for a fixed input order)."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}

    def encode(self, tokens: list[str]) -> np.ndarray:
        index = self.index
        # len(index) is evaluated before setdefault inserts, so a new token gets the next free id
        return np.fromiter([index.setdefault(t, len(index)) for t in tokens], dtype=np.int32, count=len(tokens))

    @property
    def words(self) -> list[str]:
        """provisional id -> token (dicts keep insertion order)."""
        return list(self.index)


def count(docs: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Token frequencies over ``docs`` (arrays of provisional ids), as an int64 array of length ``size``."""
    if not docs:
        return np.zeros(size, dtype=np.int64)
    return np.bincount(np.concatenate(docs), minlength=size).astype(np.int64)[:size]


def choose_vocab(
    words: Sequence[str],
    train_counts: np.ndarray,
    has_vector: Callable[[str], bool],
    min_freq: int,
    max_vocab: int | None,
) -> list[str]:
    """Training words with a vector and at least ``min_freq`` occurrences, most frequent first (ties by
    spelling, so the order does not depend on dict or thread order), capped at ``max_vocab``."""
    candidates = [
        (-int(train_counts[i]), w)
        for i, w in enumerate(words[: len(train_counts)])
        if train_counts[i] >= min_freq and has_vector(w)
    ]
    candidates.sort()
    chosen = [w for _, w in candidates]
    return chosen[:max_vocab] if max_vocab is not None else chosen


def lookup_table(words: Sequence[str], vocab: Sequence[str], oov: str) -> np.ndarray:
    """provisional id -> final id (2.. for vocabulary words; UNK_ID or DROP for the rest)."""
    final = {w: i + 2 for i, w in enumerate(vocab)}
    miss = UNK_ID if oov == "unk" else DROP
    return np.fromiter((final.get(w, miss) for w in words), dtype=np.int32, count=len(words))


def pack(docs: Sequence[np.ndarray], lut: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Map ids, drop OOV (DROP entries), keep the first L tokens, left-aligned in the zero-filled ``out``
    (N, L) int32 (written in place: no second copy of the largest array). Returns the untruncated
    lengths (N,), for truncation statistics."""
    max_len = out.shape[1]
    lengths = np.zeros(len(docs), dtype=np.int64)
    for i, doc in enumerate(docs):
        mapped = lut[doc]
        mapped = mapped[mapped != DROP]
        lengths[i] = len(mapped)
        head = mapped[:max_len]
        out[i, : len(head)] = head
    return lengths
