"""Word n-grams as extra tokens: "not good" gets a vector of its own.

The networks pool their tokens with attention, which sees a review as a set of words: "not good" and
"good, not" read alike. Appending each sequence's frequent n-grams (n ≥ 2) as tokens of their own gives the
pooled representation the local word order a bag-of-n-grams classifier uses. With learned word vectors
(``model.learn_embeddings``) each n-gram row is learned like a word's; it starts from the mean of its
words' vectors, so a frozen table reads it as the phrase's centroid.

The n-gram vocabulary comes from the training split only (``min_freq`` occurrences), like the words';
an n-gram of the test split that training never saw is simply not added. N-grams are formed over the
truncated id sequence the network reads (dropped out-of-vocabulary words are skipped, UNK and padding never
enter one). Each stream gets its own: for sentence pairs, the premise's n-grams follow the premise's words.

>>> import torch
>>> from analog_ep.data.dataset import SequenceDataset, TaskData
>>> ids = torch.tensor([[[2, 3, 4, 0]], [[2, 3, 0, 0]]], dtype=torch.int32)
>>> split = SequenceDataset(ids, torch.tensor([0, 1]))
>>> words = TaskData("toy", split, split, split, torch.eye(5), 2, ["a", "b"], 1, 4,
...                  vocab=["<pad>", "<unk>", "not", "good", "film"])
>>> grams = add_ngrams(words, n=2, min_freq=2)
>>> grams.vocab[5:], grams.train.ids[0, 0].tolist()
(['not good'], [2, 3, 4, 5, 0, 0, 0])
>>> grams.embedding[5].tolist()
[0.0, 0.0, 0.5, 0.5, 0.0]
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from analog_ep.data.dataset import SequenceDataset, TaskData
from analog_ep.embedding import PAD_ID
from analog_ep.errors import DataError

FIRST_WORD_ID = 2  # ids 0 and 1 are padding and UNK: neither forms an n-gram
MAX_N = 3


def add_ngrams(data: TaskData, n: int, min_freq: int) -> TaskData:
    """``data`` with the training split's n-grams of orders 2..n appended to every sequence.

    Each sequence of L word slots becomes L + (L-1) + ... + (L-n+1) slots: its words, then its known
    bigrams, trigrams, ..., left-aligned, then padding. The vocabulary grows by one row per kept n-gram.
    """
    check_ngram_args(n, min_freq)
    if n == 1:
        return data
    words = {role: split.ids.numpy() for role, split in data.splits.items()}  # (N, S, L) int32
    num_words = len(data.vocab)
    vocab, table = list(data.vocab), data.embedding.numpy()
    prev = {role: ids.astype(np.int64) for role, ids in words.items()}  # (order-1)-gram ids starting at each slot
    parts = {role: [ids] for role, ids in words.items()}
    added: dict[str, int] = {}
    for order in range(2, n + 1):
        size = len(vocab)  # the first id this order hands out
        keys = {role: _pair_keys(prev[role], ids, order, num_words) for role, ids in words.items()}
        train_keys = keys["train"][keys["train"] >= 0]
        uniq, counts = np.unique(train_keys, return_counts=True)
        kept = uniq[counts >= min_freq]
        prefix, last = kept // num_words, kept % num_words
        vocab.extend(f"{vocab[a]} {vocab[b]}" for a, b in zip(prefix.tolist(), last.tolist(), strict=True))
        # the mean of the n words' vectors: the prefix's vector holds the mean of the first n-1
        start = ((order - 1) * table[prefix] + table[last]) / order
        table = np.concatenate([table, start.astype(table.dtype)])
        for role, k in keys.items():
            pos = np.clip(np.searchsorted(kept, k), 0, max(len(kept) - 1, 0))
            hit = (k >= 0) & (kept[pos] == k) if len(kept) else np.zeros(k.shape, dtype=bool)
            prev[role] = np.where(hit, pos + size, -1)
            parts[role].append(np.where(hit, pos + size, PAD_ID).astype(np.int32))
        added[str(order)] = len(kept)
    splits = {role: _left_align(np.concatenate(parts[role], axis=2)) for role in words}
    max_len = next(iter(splits.values())).shape[2]
    info = {**data.info, "max_len": max_len,
            "ngrams": {"n": n, "min_freq": min_freq, "added": added, "word_slots": data.max_len,
                       "word_ids": num_words}}
    info["vocab"] = {**data.info.get("vocab", {}), "size": len(vocab)}
    datasets = {role: SequenceDataset(torch.from_numpy(ids), data.splits[role].labels, role)
                for role, ids in splits.items()}
    return dataclasses.replace(
        data,
        **datasets,
        embedding=torch.from_numpy(table),
        max_len=max_len,
        info=info,
        vocab=vocab,
    )


def slots(word_slots: int, n: int) -> int:
    """Sequence length with the n-grams of orders 2..n appended to ``word_slots`` words.

    >>> slots(600, 2), slots(600, 1)
    (1199, 600)
    """
    return sum(max(word_slots - k + 1, 0) for k in range(1, n + 1))


def word_ids(data: TaskData) -> int:
    """How many ids (PAD and UNK included) are words: the n-gram rows follow them."""
    return int(data.info.get("ngrams", {}).get("word_ids", data.embedding.shape[0]))


def check_ngram_args(n: int, min_freq: int) -> None:
    """Refuse an order or count that cannot work, before any data is read."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise DataError(f"n-gram order must be 1 (words only), 2 (word pairs) or {MAX_N}, got {n!r}")
    if isinstance(min_freq, bool) or not isinstance(min_freq, int) or min_freq < 1:
        raise DataError(f"n-gram min_freq must be an integer ≥ 1 (train occurrences), got {min_freq!r}")


def _pair_keys(prev: np.ndarray, words: np.ndarray, order: int, num_words: int) -> np.ndarray:
    """Key (prefix id · V + next word) of the order-``order`` gram at each start slot; -1 where there is none.

    ``prev`` holds the (order-1)-gram id starting at each slot (-1: none was kept there).
    """
    head, tail = prev[..., :-1], words[..., order - 1:].astype(np.int64)
    valid = (head >= FIRST_WORD_ID) & (tail >= FIRST_WORD_ID)
    return np.where(valid, head * num_words + tail, -1)


def _left_align(ids: np.ndarray) -> np.ndarray:
    """Move every row's non-padding ids to the front, keeping their order (the width stays: the model's
    sequence length must not depend on which reviews a split holds)."""
    order = np.argsort(ids == PAD_ID, axis=-1, kind="stable")
    return np.ascontiguousarray(np.take_along_axis(ids, order, axis=-1))
