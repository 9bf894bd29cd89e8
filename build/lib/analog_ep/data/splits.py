"""Seeded index selection: the stratified validation carve and class-balanced size limits.

Pure functions of (labels, size, seed) that return sorted index arrays, so a subset keeps the source
order and the same arguments always give the same records on any machine (numpy's PCG64 generator).
"""

from __future__ import annotations

import numpy as np

from analog_ep.errors import DataError

# one independent random stream per purpose, so changing train_limit does not move the validation split
SALT = {"carve": 1, "train": 2, "val": 3, "test": 4}


def check_val_size(size: float | int) -> None:
    """A fraction in [0, 1) or a non-negative count (checked against the split size by ``carve_count``)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise DataError(f"val_size must be a fraction in [0, 1) or a record count, not {size!r}")
    if isinstance(size, float) and not 0.0 <= size < 1.0:
        raise DataError(f"val_size={size} is not a fraction in [0, 1): use e.g. 0.1, or a count such as 2500")
    if isinstance(size, int) and size < 0:
        raise DataError(f"val_size={size} must not be negative")


def carve_count(size: float | int, n: int) -> int:
    """``val_size`` as a record count: a fraction of ``n``, or an absolute count below ``n``."""
    check_val_size(size)
    if isinstance(size, float):
        return int(round(size * n))
    if size >= n:
        raise DataError(f"val_size={size} must be a count between 0 and {n - 1} (the training split has {n})")
    return size


def carve_stratified(labels: np.ndarray, size: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, carved); ``carved`` keeps the class proportions of ``labels``."""
    n = len(labels)
    n_carve = carve_count(size, n)
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_carve * counts / n
    quota = np.floor(exact).astype(np.int64)
    short = n_carve - int(quota.sum())  # largest remainders get the leftover records
    quota[np.argsort(-(exact - quota), kind="stable")[:short]] += 1
    rng = np.random.default_rng([seed, SALT["carve"]])
    parts = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    carved = np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(n), carved, assume_unique=True)
    return keep, carved


def balanced_subset(labels: np.ndarray, limit: int | None, seed: int, purpose: str) -> np.ndarray:
    """At most ``limit`` (a positive int, checked by the caller) indices, as class-balanced as the data
    allows: classes are shuffled, then taken round-robin."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, SALT[purpose]])
    idx, rank, cls = [], [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        idx.append(members)
        rank.append(np.arange(len(members)))
        cls.append(np.full(len(members), c))
    idx_all, rank_all, cls_all = np.concatenate(idx), np.concatenate(rank), np.concatenate(cls)
    order = np.lexsort((cls_all, rank_all))  # rank first, then class: c0 c1 c2 c0 c1 c2 ...
    return np.sort(idx_all[order[:limit]])
