"""One modern Hopfield retrieval step (Ramsauer et al. 2020): the projection layers' state update.

`softmax(γ Q Kᵀ) V` with the input tokens as stored patterns (K = V = X in the paper's reference).
One step lands exponentially close to a fixed point, so one retrieval per EP step suffices.
"""

from __future__ import annotations

import torch


def hopfield_weights(
    query: torch.Tensor,
    keys: torch.Tensor,
    gamma: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(γ query keysᵀ) over the keys: (..., Lq, Lk).

    With a mask (..., Lk; True = real token) padding keys get zero weight, and a row with no real key
    gets all-zero weights (it retrieves zeros instead of NaN). Shared with the spiking attention.
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)) * gamma
    if key_mask is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~key_mask.unsqueeze(-2), float("-inf"))
    return torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)


def hopfield_retrieve(
    query: torch.Tensor,
    keys: torch.Tensor,
    gamma: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retrieve `softmax(γ query keysᵀ) keys` row by row.

    query: (..., Lq, d); keys: (..., Lk, d); key_mask: (..., Lk) bool, True = real token.
    Every output row is a convex combination of the (unmasked) key rows.
    """
    return torch.matmul(hopfield_weights(query, keys, gamma, key_mask), keys)
