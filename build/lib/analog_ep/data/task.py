"""``load_task``: the one entry point that turns a task name into ``TaskData``, from the cache if it can.

Order of work on a cache miss: read and validate the sources, carve validation from train (IMDB), apply
size limits, tokenise every split once into provisional ids, choose the vocabulary from train counts, load
(or train) the vectors, map and pad, compute statistics, write the cache entry atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from analog_ep.data import cache, sources, splits, vocab
from analog_ep.data.dataset import SequenceDataset, TaskData
from analog_ep.data.sources import RawSplit, TaskSpec
from analog_ep.data.tokenizer import TOKENIZER_VERSION, tokenize
from analog_ep.data.vectors import VectorSpec, load_vectors, parse_vectors
from analog_ep.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
OOV_CHOICES = ("drop", "unk")


def _positive(name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer{' or None' if optional else ''}, not {value!r}")


def _check_args(
    spec: TaskSpec,
    max_len: int | None,
    min_freq: int,
    max_vocab: int | None,
    oov: str,
    train_limit: int | None,
    eval_limit: int | None,
    seed: int,
) -> int:
    max_len = spec.default_max_len if max_len is None else max_len
    _positive("max_len", max_len, optional=False)
    _positive("min_freq", min_freq, optional=False)
    _positive("max_vocab", max_vocab)
    _positive("train_limit", train_limit)
    _positive("eval_limit", eval_limit)
    if oov not in OOV_CHOICES:
        raise DataError(f"oov must be one of {OOV_CHOICES}, not {oov!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DataError(f"seed must be an integer, not {seed!r}")
    return max_len


def load_task(
    task: str,
    data_dir: str | os.PathLike[str] | None = None,
    max_len: int | None = None,
    vectors: str = "glove50",
    min_freq: int = 1,
    max_vocab: int | None = None,
    oov: str = "drop",
    val_size: float | int = 0.1,
    train_limit: int | None = None,
    eval_limit: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TaskData:
    """Load ``"imdb"`` or ``"snli"`` as token-id datasets plus a frozen embedding matrix.

    Data comes from ``data_dir``, else ``$SEQEP_DATA_DIR``, else the Hugging Face hub. Validation is
    carved from train for IMDB (``val_size``, stratified, seeded) and is the official dev split for SNLI.
    The result is cached under ``cache_dir`` (else ``$SEQEP_CACHE_DIR``, else ``~/.cache/seqep``) keyed
    by every argument that changes it; see docs/data.md for the full contract.
    """
    start = time.perf_counter()
    spec = sources.get_spec(task)
    max_len = _check_args(spec, max_len, min_freq, max_vocab, oov, train_limit, eval_limit, seed)
    data_path = sources.resolve_data_dir(data_dir)
    cache_root = cache.resolve_cache_dir(cache_dir)
    vspec = parse_vectors(vectors, data_path)
    carve = "val" not in spec.local_splits
    if carve:
        splits.check_val_size(val_size)  # now, so a bad value fails before any work
    files = sources.locate_local_files(spec, data_path) if data_path is not None else None
    if files is not None:
        source_id: dict[str, Any] = {
            "local": {role: {"split": stem, **cache.file_identity(p)} for role, (stem, p) in files.items()}
        }
    else:
        source_id = {"hub": spec.hub_id, "splits": dict(spec.hub_splits)}
    corpus_key = {
        "task": spec.name,
        "source": source_id,
        "tokenizer": TOKENIZER_VERSION,
        "val_size": val_size if carve else None,
        "train_limit": train_limit,
        "eval_limit": eval_limit,
        "seed": seed,
    }
    settings = {"max_len": max_len, "min_freq": min_freq, "max_vocab": max_vocab, "oov": oov}
    key = cache.cache_key({**corpus_key, **settings, "vectors": vspec.identity})
    path = cache_root / "tasks" / f"{spec.name}-{key[:20]}.pt"

    source = {"local": str(data_path)} if data_path is not None else {"hub": spec.hub_id}
    entry = cache.try_load(path)
    if entry is not None:
        data = _from_entry(entry, spec)
        data.info.update(source=source, cache_path=str(path), cache_hit=True)
        data.info["load_seconds"] = round(time.perf_counter() - start, 3)
    else:

        def read() -> dict[str, RawSplit]:
            if files is not None:
                return sources.read_local(spec, files, cache_root, progress)
            return sources.read_hub(spec, progress)

        data, entry = _build(spec, read, vspec, corpus_key, settings, cache_root, val_size, progress)
        data.info.update(source=source, cache_key=key, cache_path=str(path), cache_hit=False)
        data.info["build_seconds"] = data.info["load_seconds"] = round(time.perf_counter() - start, 3)
        entry["info"] = json.dumps(data.info)
        cache.atomic_save(entry, path)
    if data.info.get("train_is_subset"):
        log.warning("%s: %s", spec.name, data.info["notes"][0])
    return data


def _from_entry(entry: dict[str, Any], spec: TaskSpec) -> TaskData:
    info = json.loads(entry["info"])
    datasets = {role: SequenceDataset(entry[f"{role}_ids"], entry[f"{role}_labels"], role) for role in ROLES}
    return TaskData(
        name=spec.name,
        **datasets,
        embedding=entry["embedding"],
        num_classes=len(spec.class_names),
        class_names=list(spec.class_names),
        num_streams=len(spec.streams),
        max_len=info["max_len"],
        info=info,
        vocab=entry["vocab"].split("\n"),
    )


def _arrange_splits(
    spec: TaskSpec, raw: dict[str, RawSplit], val_size: float | int, limits: dict[str, int | None], seed: int
) -> tuple[dict[str, RawSplit], dict[str, dict[str, Any]]]:
    """Carve validation (IMDB), apply the size limits; say where each split came from."""
    out = dict(raw)
    meta: dict[str, dict[str, Any]] = {}
    if "val" not in raw:
        keep, carved = splits.carve_stratified(raw["train"].labels, val_size, seed)
        out["val"] = raw["train"].select(carved, role="val")
        out["train"] = raw["train"].select(keep)
        meta["val"] = {"carved_from_train": True, "val_size": val_size}
    for role in ROLES:
        meta.setdefault(role, {})["source_split"] = out[role].source_split
        meta[role]["origin"] = out[role].origin
        limit = limits[role]
        if limit is not None and limit < len(out[role]):
            meta[role]["limited_from"] = len(out[role])
            out[role] = out[role].select(splits.balanced_subset(out[role].labels, limit, seed, role))
        if out[role].dropped:
            meta[role]["dropped"] = out[role].dropped
    return out, meta


def _tokenise(raw: dict[str, RawSplit], progress: bool) -> tuple[vocab.Interner, dict[str, list[list[np.ndarray]]]]:
    interner = vocab.Interner()
    docs: dict[str, list[list[np.ndarray]]] = {}
    for role in ROLES:  # train first: provisional ids, hence ties, do not depend on val/test
        split = raw[role]
        total = len(split) * len(split.texts)
        with tqdm(total=total, desc=f"tokenise {role}", unit="text", disable=not progress, leave=False) as bar:
            docs[role] = []
            for stream in split.texts:
                encoded = []
                for text in stream:
                    encoded.append(interner.encode(tokenize(text)))
                    bar.update(1)
                docs[role].append(encoded)
        split.texts = []  # the strings are no longer needed: free them before the vectors load
    return interner, docs


def _length_stats(lengths: np.ndarray, max_len: int) -> dict[str, Any]:
    """lengths: (N, S) tokens per sequence after OOV handling, before truncation."""
    if lengths.shape[0] == 0:
        return {"fraction_truncated": 0.0}
    over = lengths > max_len
    return {
        "fraction_truncated": round(float(over.any(axis=1).mean()), 6),
        "fraction_truncated_by_stream": [round(float(x), 6) for x in over.mean(axis=0)],
        "mean_tokens": [round(float(x), 2) for x in lengths.mean(axis=0)],
        "p95_tokens": [int(x) for x in np.percentile(lengths, 95, axis=0, method="higher")],
        "max_tokens": [int(x) for x in lengths.max(axis=0)],
        "empty_sequences": int((lengths == 0).any(axis=1).sum()),
    }


def _build(
    spec: TaskSpec,
    read: Callable[[], dict[str, RawSplit]],
    vspec: VectorSpec,
    corpus_key: dict[str, Any],
    settings: dict[str, Any],
    cache_root: Path,
    val_size: float | int,
    progress: bool,
) -> tuple[TaskData, dict[str, Any]]:
    seed, max_len = corpus_key["seed"], settings["max_len"]
    limits = {
        "train": corpus_key["train_limit"],
        "val": corpus_key["eval_limit"],
        "test": corpus_key["eval_limit"],
    }
    words: list[str] = []
    docs: dict[str, list[list[np.ndarray]]] = {}

    def sentences() -> Iterator[list[str]]:  # the training split's text, for w2v
        return ([words[i] for i in d] for stream in docs["train"] for d in stream)

    def vectors() -> tuple[Any, dict[str, Any]]:
        return load_vectors(
            vspec, sentences=sentences, corpus_key=corpus_key, cache_root=cache_root, seed=seed, progress=progress
        )

    # pre-trained vectors load first, so an unusable vector source fails before minutes of reading
    loaded = vectors() if vspec.kind not in ("w2v", "random") else None  # those two need the training text
    raw, split_meta = _arrange_splits(spec, read(), val_size, limits, seed)  # no caller keeps the full texts
    labels = {role: raw[role].labels for role in ROLES}
    interner, tokenised = _tokenise(raw, progress)
    docs.update(tokenised)
    words.extend(interner.words)
    train_counts = vocab.count([d for stream in docs["train"] for d in stream], len(words))

    kv, vinfo = loaded if loaded is not None else vectors()
    del loaded
    key_to_index = kv.key_to_index
    has_vec = np.fromiter((w in key_to_index for w in words), dtype=bool, count=len(words))
    chosen = vocab.choose_vocab(
        words, train_counts, lambda w: w in key_to_index, settings["min_freq"], settings["max_vocab"]
    )
    lut = vocab.lookup_table(words, chosen, settings["oov"])
    matrix = np.zeros((len(chosen) + 2, kv.vector_size), dtype=np.float32)
    if chosen:
        matrix[2:] = kv.vectors[[key_to_index[w] for w in chosen]]
    if not np.isfinite(matrix).all():
        raise DataError(f"vectors {vspec.text!r} contain NaN or infinite values for some vocabulary words.")
    del kv

    entry: dict[str, Any] = {"format": cache.FORMAT_VERSION}
    datasets: dict[str, SequenceDataset] = {}
    split_info: dict[str, Any] = {}
    trunc: dict[str, Any] = {}
    coverage_in_vocab: dict[str, float] = {}
    for role in ROLES:
        ids_np = np.zeros((len(labels[role]), len(docs[role]), max_len), dtype=np.int32)  # (N, S, L)
        lengths = np.stack([vocab.pack(stream, lut, ids_np[:, s]) for s, stream in enumerate(docs[role])], axis=1)
        ids = torch.from_numpy(ids_np)
        y = torch.from_numpy(labels[role].astype(np.int64))
        datasets[role] = SequenceDataset(ids, y, role)
        entry[f"{role}_ids"], entry[f"{role}_labels"] = ids, y
        counts = np.bincount(labels[role], minlength=len(spec.class_names))
        split_info[role] = {
            **split_meta[role],
            "size": len(y),
            "label_counts": {n: int(c) for n, c in zip(spec.class_names, counts, strict=True)},
        }
        trunc[role] = _length_stats(lengths, max_len)
        flat = np.concatenate([d for stream in docs[role] for d in stream]) if len(y) else np.zeros(0, np.int32)
        coverage_in_vocab[role] = round(float((lut[flat] >= 2).mean()), 6) if len(flat) else 0.0
        docs[role] = []
    total = int(train_counts.sum())
    notes = []
    if raw["train"].source_split == "train_subset":
        notes.append(
            "SNLI train is train_subset: a 20,000-pair random sample of the 550,152-pair train split, "
            "NOT the full split; results are not comparable with full-SNLI numbers"
        )
    if spec.name == "snli":
        notes.append("SNLI validation is the official dev split (val_size is ignored)")
    info: dict[str, Any] = {
        "task": spec.name,
        "class_names": list(spec.class_names),
        "streams": list(spec.streams),
        "num_streams": len(spec.streams),
        "max_len": max_len,
        "train_is_subset": raw["train"].source_split == "train_subset",
        "notes": notes,
        "splits": split_info,
        "limits": {
            "val_size": val_size if "carved_from_train" in split_meta["val"] else None,
            "train_limit": limits["train"],
            "eval_limit": limits["test"],
            "seed": seed,
        },
        "tokenizer": TOKENIZER_VERSION,
        "vocab": {
            "size": len(chosen) + 2,
            "words": len(chosen),
            "specials": [vocab.PAD, vocab.UNK],
            "train_types": int((train_counts > 0).sum()),
            "train_types_with_vector": int(((train_counts > 0) & has_vec).sum()),
            "min_freq": settings["min_freq"],
            "max_vocab": settings["max_vocab"],
            "oov": settings["oov"],
        },
        "vectors": vinfo,
        "dim": int(matrix.shape[1]),
        "train_tokens": total,
        "coverage": round(float(train_counts[has_vec].sum() / total), 6) if total else 0.0,
        "coverage_in_vocab": coverage_in_vocab,
        "truncation": trunc,
    }
    embedding = torch.from_numpy(matrix)
    vocab_list = [vocab.PAD, vocab.UNK, *chosen]
    entry["embedding"], entry["vocab"] = embedding, "\n".join(vocab_list)
    data = TaskData(
        name=spec.name,
        **datasets,
        embedding=embedding,
        num_classes=len(spec.class_names),
        class_names=list(spec.class_names),
        num_streams=len(spec.streams),
        max_len=max_len,
        info=info,
        vocab=vocab_list,
    )
    return data, entry
