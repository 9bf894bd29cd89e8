"""Synthetic sequence tasks for unit tests only (real data lives in SEQEP_DATA_DIR)."""

from __future__ import annotations

import torch


def token_presence_task(n: int, seq_len: int = 12, dim: int = 8, vocab: int = 16, seed: int = 0,
                        embedding_seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 1 iff the signal token (id 0) appears *anywhere* in the sequence; x: (n, 1, L, d).

    Half the sequences carry the signal token at a uniformly random position, so a position-wise
    classifier must learn the same detector at every position, while attention pools over positions.
    """
    emb = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(embedding_seed))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, seq_len), generator=g)
    labels = torch.arange(n) % 2
    pos = torch.randint(0, seq_len, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = 0
    perm = torch.randperm(n, generator=g)
    return emb[ids[perm]].unsqueeze(1), labels[perm]


def gaussian_clusters(n: int, dim: int = 20, classes: int = 3, noise: float = 1.0, seed: int = 0,
                      centers_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy class centres as flat inputs for MLP graphs: x (n, 1, 1, dim)."""
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(centers_seed))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centers[labels] + noise * torch.randn(n, dim, generator=g)
    return x.view(n, 1, 1, dim), labels
