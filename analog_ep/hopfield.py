"""One modern Hopfield retrieval step (Ramsauer et al. 2020): the projection layers' state update.

`softmax(γ Q Kᵀ) V` with the input tokens as stored patterns (K = V = X in the paper's reference).
One step lands exponentially close to a fixed point, so one retrieval per EP step suffices.
"""

from __future__ import annotations

import torch


def hopfield_retrieve(
    query: torch.Tensor,
    keys: torch.Tensor,
    gamma: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Retrieve `softmax(γ query keysᵀ) keys` row by row.

    query: (..., Lq, d); keys: (..., Lk, d); key_mask: (..., Lk) bool, True = real token.
    With a mask, padding keys get zero weight and a sequence with no real token retrieves zeros
    (instead of NaN). Every output row is a convex combination of the (unmasked) key rows.
    """
    scores = torch.matmul(query, keys.transpose(-1, -2))
    scores = scores * gamma
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.unsqueeze(-2), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.nan_to_num(weights, nan=0.0)
    else:
        weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, keys)
