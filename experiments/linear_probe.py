"""Linear probe of the inputs a network sees: logistic regression on mean-pooled word vectors.

Why: a model that reads frozen vectors cannot beat what those vectors carry. This fits a logistic
regression (full-batch L-BFGS, torch) on the mean of each review's vectors exactly as the task pipeline
embeds them (same tokeniser, vocabulary, OOV rule, optional standardisation) and reports val/test
accuracy and the OOV rate, so a vector source can be judged before an EP run is spent on it.

    python experiments/linear_probe.py --task imdb --vectors glove50 --vectors w2v:300
    python experiments/linear_probe.py --task snli [--overlap]     # pairs: [p, h, p⊙h, |p − h|] (+ overlap)
"""

from __future__ import annotations

import argparse
import json

import torch

from analog_ep.data import load_task
from analog_ep.data.vocab import PAD_ID, UNK_ID


def pooled_features(ids: torch.Tensor, embedding: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N, S·d) mean vector of the real tokens of each stream, without forming (N, L, d) at once."""
    out = []
    for lo in range(0, ids.shape[0], chunk):
        block = ids[lo:lo + chunk].long()
        vecs = embedding[block]  # (n, S, L, d)
        mask = (block != PAD_ID).unsqueeze(-1).to(vecs.dtype)
        mean = (vecs * mask).sum(2) / mask.sum(2).clamp_min(1.0)
        out.append(mean.flatten(1))
    return torch.cat(out)


def pair_features(ids: torch.Tensor, embedding: torch.Tensor, overlap: bool) -> torch.Tensor:
    """Sentence pairs (N, 2, L): [p, h, p⊙h, |p − h|] of the mean vectors, and with `overlap` the share of
    each sentence's tokens found in the other, "hypothesis fully inside the premise", and the mean vector
    of the hypothesis tokens that are not in the premise (the words the hypothesis adds)."""
    from analog_ep.data import exact_match_flags

    d = embedding.shape[1]
    pooled = pooled_features(ids, embedding)
    p, h = pooled[:, :d], pooled[:, d:]
    parts = [p, h, p * h, (p - h).abs()]
    if overlap:
        ids = ids.long()
        real = ids != PAD_ID
        match = exact_match_flags(ids).squeeze(-1)
        share = match.sum(-1) / real.sum(-1).clamp_min(1)  # (N, 2)
        contained = (match[:, 1] == real[:, 1]).all(-1, keepdim=True)
        new = (real[:, 1] & ~match[:, 1]).unsqueeze(-1).float()
        added = (embedding[ids[:, 1]] * new).sum(1) / new.sum(1).clamp_min(1)
        parts += [share.float(), contained.float(), added]
    return torch.cat(parts, 1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float, iters: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression, L2-penalised, by full-batch L-BFGS on standardised features."""
    model = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + l2 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def probe(task: str, vectors: str, max_len: int | None, l2: float, train_limit: int | None = None,
          overlap: bool = False) -> dict:
    data = load_task(task, max_len=max_len, vectors=vectors, train_limit=train_limit, progress=False)
    emb = data.embedding.float()
    if data.num_streams == 2:
        feats = {name: pair_features(split.ids, emb, overlap) for name, split in data.splits.items()}
    else:
        feats = {name: pooled_features(split.ids, emb) for name, split in data.splits.items()}
    mean, std = feats["train"].mean(0), feats["train"].std(0).clamp_min(1e-8)
    feats = {k: (v - mean) / std for k, v in feats.items()}
    model = fit_logistic(feats["train"], data.train.labels, data.num_classes, l2)
    with torch.no_grad():
        acc = {f"{name}_accuracy": float((model(f).argmax(-1) == data.splits[name].labels).float().mean())
               for name, f in feats.items()}
    ids = data.train.ids
    return {
        "task": task, "vectors": vectors, "overlap": overlap, "train_sequences": len(data.train), "dim": data.dim,
        "vocab": emb.shape[0],
        "train_unk_rate": float((ids == UNK_ID).sum()) / float((ids != PAD_ID).sum()),
        "zero_rows": float((emb.abs().sum(1) == 0).float().mean()), **acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="imdb", choices=["imdb", "snli"])
    parser.add_argument("--vectors", action="append", help="vector source (repeatable); default glove50")
    parser.add_argument("--max-len", type=int, help="tokens per sequence (default: the task's, 600 / 25)")
    parser.add_argument("--overlap", action="store_true", help="SNLI: add premise-hypothesis overlap features")
    parser.add_argument("--train-limit", type=int, help="use only this many training sequences (also the "
                        "word2vec corpus for w2v:DIM vectors)")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights")
    args = parser.parse_args()
    for v in args.vectors or ["glove50"]:
        print(json.dumps(probe(args.task, v, args.max_len, args.l2, args.train_limit, args.overlap)), flush=True)


if __name__ == "__main__":
    main()
