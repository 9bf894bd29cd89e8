"""Token ids -> word vectors: the lookup both the data pipeline and Φ's learned word vectors use.

The lookup lives with the engine because a learned table is a parameter of Φ (`EPNet.embedding`): the same
differentiable lookup serves frozen vectors (`TaskData.embedding`) and learned ones, so backprop through it
(BPTT) and EP's scatter of the contrast onto the rows (`embedding_grad`) see the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD_ID = 0  # the data pipeline's padding id (`analog_ep.data.vocab.PAD_ID`): its vector is exactly zero


@dataclass(frozen=True)
class PairFeatures:
    """Channels appended to every token of a sentence pair (S = 2), computed from the pair itself.

    Why: whether the hypothesis says what the premise says is decided word against word, and a network
    that reads each sentence through pooled attention glimpses sees the two sentences apart. These channels
    bring the comparison to the token: `exact_match` (1 where the word also occurs in the other sentence)
    and `alignment` (the cosine similarity to the closest word of the other sentence, then the token's
    vector minus the other sentence's softly aligned vector, softmax over cosine similarities × `temperature`).
    """

    exact_match: bool = False
    alignment: bool = False
    temperature: float = 10.0

    def channels(self, dim: int) -> int:
        """Channels added to a `dim`-wide word vector."""
        return int(self.exact_match) + (1 + dim) * int(self.alignment)


NO_PAIR_FEATURES = PairFeatures()


def embed_batch(ids: torch.Tensor, embedding: torch.Tensor, features: PairFeatures = NO_PAIR_FEATURES
                ) -> torch.Tensor:
    """``(B, S, L)`` ids -> ``(B, S, L, d)`` vectors in ``embedding``'s dtype and device.

    Padding positions are exactly zero even if row 0 of ``embedding`` is not (e.g. after a careless update).
    ``features`` (sentence pairs, S = 2) appends the `PairFeatures` channels after the word vector, in the
    order: exact-match flag, then alignment (similarity, difference).
    """
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
    ids = ids.to(device=embedding.device, dtype=torch.long)
    out = torch.nn.functional.embedding(ids, embedding).masked_fill((ids == PAD_ID).unsqueeze(-1), 0)
    parts = [out]
    if features.exact_match:
        parts.append(exact_match_flags(ids).to(out.dtype))
    if features.alignment:
        parts.append(alignment_channels(ids, out, features.temperature))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else out


def alignment_channels(ids: torch.Tensor, vectors: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """(B, 2, L) ids and their (B, 2, L, d) vectors -> (B, 2, L, 1 + d): per real token, its largest cosine
    similarity to a word of the other sentence (clipped at 0), then its vector minus the other sentence's
    vectors averaged with weights softmax(temperature · cosine). Padding rows are zero.

    Why: the difference to the aligned word says what the hypothesis adds or changes word by word ("a man
    sleeps" against "a man runs": near zero for "a man", large for the verb), which a pooled reading of
    each sentence apart cannot see; with it the SNLI `cpu` preset reaches 71.75 % against 68.69 % without
    (docs/results.md).

    Example:
        >>> import torch
        >>> vectors = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.]])   # PAD and three words
        >>> ids = torch.tensor([[[1, 2, 0], [1, 0, 0]]])                       # premise "1 2", hypothesis "1"
        >>> x = embed_batch(ids, vectors, PairFeatures(alignment=True))
        >>> x.shape                                                            # d + 1 + d channels
        torch.Size([1, 2, 3, 5])
        >>> x[0, 1, 0, :3].tolist()   # hypothesis word 1: its vector, similarity 1 to premise word 1 ...
        [1.0, 0.0, 1.0]
        >>> bool(x[0, 1, 0, 3:].abs().max() < 1e-4)   # ... which it aligns to: difference ~ 0
        True
        >>> x[0, 0, 1, 2:].tolist()   # premise word 2 has no similar word: similarity 0, difference (-1, 1)
        [0.0, -1.0, 1.0]
    """
    if ids.dim() != 3 or ids.shape[1] != 2:
        raise ValueError(f"alignment channels need sentence pairs, ids of shape (B, 2, L); got {tuple(ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"the alignment temperature must be > 0, got {temperature}")
    real = ids != PAD_ID  # (B, 2, L)
    unit = torch.nn.functional.normalize(vectors, dim=-1)
    cosine = unit[:, 0] @ unit[:, 1].transpose(1, 2)  # (B, L, L): premise token i against hypothesis token j
    pairs = real[:, 0].unsqueeze(-1) & real[:, 1].unsqueeze(-2)
    closest = cosine.masked_fill(~pairs, -1.0)
    similarity = torch.stack([closest.amax(-1), closest.amax(-2)], dim=1).clamp(min=0)  # (B, 2, L)
    scores = (temperature * cosine).masked_fill(~pairs, float("-inf"))
    to_hyp = torch.softmax(scores, -1).nan_to_num(0.0) @ vectors[:, 1]  # an empty other sentence aligns to 0
    to_prem = torch.softmax(scores.transpose(1, 2), -1).nan_to_num(0.0) @ vectors[:, 0]
    difference = vectors - torch.stack([to_hyp, to_prem], dim=1)
    out = torch.cat([similarity.unsqueeze(-1), difference], dim=-1)
    return out.masked_fill(~real.unsqueeze(-1), 0)


def exact_match_flags(ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, L) ids -> (B, 2, L, 1): 1 where a real token's word also occurs in the pair's other sentence.

    Why: whether the hypothesis repeats the premise is the strongest cheap SNLI signal (a logistic
    regression on mean GloVe vectors goes from 55.8 % to 62.8 % test with overlap features,
    docs/results.md), and word vectors alone cannot express "the same word": a per-token flag can.
    """
    if ids.dim() != 3 or ids.shape[1] != 2:
        raise ValueError(f"exact-match flags need sentence pairs, ids of shape (B, 2, L); got {tuple(ids.shape)}")
    same = ids[:, 0].unsqueeze(-1) == ids[:, 1].unsqueeze(-2)  # (B, L, L): token i of the first = token j of the second
    return (torch.stack([same.any(-1), same.any(-2)], dim=1) & (ids != PAD_ID)).unsqueeze(-1)


def embedding_grad(ids: torch.Tensor, token_grads: torch.Tensor, rows: int) -> torch.Tensor:
    """The gradient of a lookup table from the gradients of the vectors it produced: row v collects the sum over
    every position holding token v (a sparse, local update: only the rows of the batch's tokens move).

    ids: (...,) integer; token_grads: (..., e) for the first e channels of the looked-up vectors; PAD gets none.
    """
    flat = ids.reshape(-1).long()
    grad = torch.zeros(rows, token_grads.shape[-1], dtype=token_grads.dtype, device=token_grads.device)
    grad.index_add_(0, flat, token_grads.reshape(flat.shape[0], -1))
    grad[PAD_ID] = 0
    return grad
