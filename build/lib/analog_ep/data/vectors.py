"""Word vectors through gensim ``KeyedVectors``, from any of five sources named by one string.

* ``glove50``: the shipped pair ``<data-dir>/vectors/glove.6B.50d.imdb_snli.{npy,vocab.txt}``;
* a path: word2vec ``.bin``, word2vec/GloVe text ``.txt``/``.vec`` (header detected; ``.gz`` fine), or
  another ``.npy`` with a ``.vocab.txt`` beside it (gensim ``.kv`` pickles are refused: `KV_REFUSED`);
* a ``gensim.downloader`` name such as ``glove-wiki-gigaword-300`` (needs network the first time);
* ``w2v:DIM[,epochs=N][,window=N][,min_count=N][,workers=N]``: gensim ``Word2Vec`` trained on the training
  split, seeded and cached. ``workers`` defaults to 1 because only a single worker thread makes gensim
  exactly reproducible; a stable ``hashfxn`` replaces Python's salted ``hash`` for the same reason.
* ``random:DIM``: seeded N(0, 1) vectors for every training word: nothing pre-trained, for a model that learns
  its word vectors from scratch (``model.learn_embeddings``); frozen, they carry no meaning.

Parsing (``parse_vectors``) is separate from loading so a cache key can be computed without loading.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analog_ep.data import cache
from analog_ep.errors import DataError

log = logging.getLogger(__name__)

GLOVE50 = "glove50"
SHIPPED_STEM = "vectors/glove.6B.50d.imdb_snli"
FILE_SUFFIXES = (".bin", ".txt", ".vec", ".kv", ".npy")
# gensim-data word-vector models (gensim.downloader.info()["models"]); listed here so an unknown name
# fails at once, offline, instead of after a network round trip.
GENSIM_NAMES = (
    "conceptnet-numberbatch-17-06-300",
    "fasttext-wiki-news-subwords-300",
    "glove-twitter-25",
    "glove-twitter-50",
    "glove-twitter-100",
    "glove-twitter-200",
    "glove-wiki-gigaword-50",
    "glove-wiki-gigaword-100",
    "glove-wiki-gigaword-200",
    "glove-wiki-gigaword-300",
    "word2vec-google-news-300",
    "word2vec-ruscorpora-300",
)
W2V_DEFAULTS = {"epochs": 5, "window": 5, "min_count": 5, "workers": 1}

HELP = (
    "glove50 (shipped GloVe 6B 50d, needs the local data dir), a vector file path (.bin, .txt, .vec, "
    f".npy+.vocab.txt), w2v:DIM[,epochs=N,window=N,min_count=N,workers=N] (train word2vec on the training "
    f"split), random:DIM (seeded random vectors, to learn from scratch), or a gensim.downloader name when "
    f"online ({', '.join(GENSIM_NAMES[9:11])}, ...)"
)


@dataclass
class VectorSpec:
    """A parsed ``vectors=`` string."""

    text: str
    kind: str  # "npy" | "file" | "gensim" | "w2v"
    path: Path | None = None
    params: dict[str, int] = field(default_factory=dict)  # w2v only
    identity: dict[str, Any] = field(default_factory=dict)  # what the cache key sees


def _unknown(text: str) -> DataError:
    return DataError(f"unknown vectors {text!r}. Use {HELP}.")


def _parse_w2v(text: str) -> dict[str, int]:
    head, *opts = text[len("w2v:") :].split(",")
    params = dict(W2V_DEFAULTS)
    try:
        params["dim"] = int(head)
        for opt in opts:
            key, value = opt.split("=", 1)
            if key.strip() not in W2V_DEFAULTS:
                raise ValueError(key)
            params[key.strip()] = int(value)
    except ValueError:
        raise DataError(
            f"cannot parse vectors {text!r}: expected "
            f"w2v:DIM[,epochs=N][,window=N][,min_count=N][,workers=N] "
            f"with integers, e.g. w2v:300 or w2v:300,epochs=10"
        ) from None
    if min(params.values()) < 1:
        raise DataError(f"vectors {text!r}: every w2v number must be at least 1")
    return params


def parse_vectors(text: str, data_dir: Path | None) -> VectorSpec:
    """Recognise the kind of source and fingerprint it (content hashes; no vectors are loaded)."""
    text = str(text).strip()
    if text == GLOVE50:
        if data_dir is None:
            raise DataError(
                "vectors 'glove50' are the shipped files in <data-dir>/vectors/, but no data dir is set. "
                "Set --data-dir or $SEQEP_DATA_DIR, or choose other vectors: w2v:300, a vector file path, "
                "or a gensim.downloader name such as glove-wiki-gigaword-50 (online)."
            )
        npy = data_dir / f"{SHIPPED_STEM}.npy"
        spec = VectorSpec(text, "npy", path=npy, params={"expect_dim": 50})
    elif text.startswith("w2v:"):
        params = _parse_w2v(text)
        return VectorSpec(text, "w2v", params=params, identity={"w2v": params})
    elif text.startswith("random:"):
        try:
            dim = int(text[len("random:"):])
        except ValueError:
            dim = 0
        if dim < 1:
            raise DataError(f"cannot parse vectors {text!r}: expected random:DIM with a positive integer, "
                            "e.g. random:50")
        return VectorSpec(text, "random", params={"dim": dim}, identity={"random": dim})
    elif text in GENSIM_NAMES:
        return VectorSpec(text, "gensim", identity={"gensim": text})
    elif _looks_like_path(text):
        try:
            path = Path(text).expanduser()
        except RuntimeError as err:  # "~user/..." for a user this machine does not have
            raise DataError(f"vector file {text!r}: {err}. Give the path without ~user.") from None
        if not path.is_file():
            raise DataError(f"vector file {path} not found. Give an existing file, or use {HELP}.")
        kind = "npy" if path.name.lower().endswith(".npy") else "file"
        spec = VectorSpec(text, kind, path=path.resolve())
    else:
        raise _unknown(text)
    assert spec.path is not None
    if spec.kind == "npy":
        vocab_path = _npy_vocab(spec.path)
        for p in (spec.path, vocab_path):
            if not p.is_file():
                raise DataError(f"vectors {text!r}: {p} is missing (an .npy matrix needs its .vocab.txt word list).")
        spec.identity = {"npy": cache.file_identity(spec.path), "vocab": cache.file_identity(vocab_path)}
    else:
        spec.identity = {"file": cache.file_identity(spec.path)}
    return spec


def _looks_like_path(text: str) -> bool:
    """A separator, a vector-file suffix, or an existing file: then a missing file is the error to report."""
    has_suffix = text.lower().removesuffix(".gz").endswith(FILE_SUFFIXES)
    return "/" in text or "\\" in text or has_suffix or Path(text).exists()


def _npy_vocab(npy: Path) -> Path:
    return npy.with_name(npy.name[: -len(".npy")] + ".vocab.txt")


# --------------------------------------------------------------------------------------------- loaders

# gensim's .kv format is a pickle: opening a shared one could run code, so it is refused with the way out.
KV_REFUSED = (
    "vector file {path}: gensim .kv files are Python pickles, which seqep does not open (loading one can run "
    "code). Where you trust the file, export it once as an .npy matrix + word list and pass the .npy: "
    "python -c \"from gensim.models import KeyedVectors as K; import numpy as np; kv = K.load('{path}'); "
    "np.save('vectors.npy', kv.vectors); open('vectors.vocab.txt', 'w').write(chr(10).join(kv.index_to_key))\""
)


def _from_arrays(words: list[str], vectors: np.ndarray) -> Any:
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=vectors.shape[1], count=0, dtype=np.float32)
    kv.add_vectors(words, np.ascontiguousarray(vectors, dtype=np.float32))
    return kv


def _random_vectors(dim: int, sentences: Callable[[], Iterable[list[str]]], seed: int) -> Any:
    """Seeded N(0, 1) vectors for the training split's words, in order of first appearance (reproducible)."""
    words = list(dict.fromkeys(w for sentence in sentences() for w in sentence))
    rng = np.random.default_rng(seed)
    return _from_arrays(words, rng.standard_normal((len(words), dim)).astype(np.float32))


def _load_npy(spec: VectorSpec) -> Any:
    assert spec.path is not None
    vocab_path = _npy_vocab(spec.path)
    try:
        matrix = np.load(spec.path, mmap_mode="r")
        words = vocab_path.read_text(encoding="utf-8").split("\n")
    except (OSError, ValueError, EOFError, UnicodeDecodeError) as err:  # EOFError: an empty file
        reason = err or type(err).__name__
        raise DataError(f"vectors {spec.text!r}: cannot read {spec.path} / {vocab_path} ({reason}). It must be a "
                        "numeric .npy matrix with one word per line of the .vocab.txt beside it.") from None
    if words and words[-1] == "":
        words.pop()
    if matrix.ndim != 2:
        raise DataError(f"{spec.path}: expected a 2-D (words x dim) matrix, got shape {matrix.shape}.")
    expect = spec.params.get("expect_dim")
    if expect is not None and matrix.shape[1] != expect:
        raise DataError(
            f"{spec.path}: vectors of dimension {matrix.shape[1]}, but {spec.text!r} means {expect}-d. "
            f"The file is not the shipped one: restore it (check with verify.py in the data dir)."
        )
    if matrix.shape[0] != len(words):
        raise DataError(
            f"{spec.path} has {matrix.shape[0]} rows but {vocab_path} lists {len(words)} words: "
            f"line i of the "
            f"word list must name row i of the matrix."
        )
    return _from_arrays(words, np.asarray(matrix))


def _opener(path: Path) -> Callable[..., Any]:
    return gzip.open if path.name.lower().endswith(".gz") else open


def _text_header(path: Path) -> tuple[int, int] | None:
    """(count, dim) when the first line is a word2vec header, None for headerless GloVe text."""
    with _opener(path)(path, "rt", encoding="utf-8", errors="replace") as fh:
        parts = fh.readline().split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    return None


def _diagnose_text(path: Path) -> str:
    """The first line whose number of values disagrees with the header or the first row."""
    header = _text_header(path)
    dim = header[1] if header else None
    with _opener(path)(path, "rt", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if lineno == 1 and header:
                continue
            values = len(line.rstrip("\n").split(" ")) - 1
            if dim is None:
                dim = values
            elif values != dim:
                where = "header" if header else "first row"
                return f"line {lineno} has {values} values where the {where} says {dim}"
    return "no line with a wrong number of values found"


def _load_file(spec: VectorSpec) -> Any:
    from gensim.models import KeyedVectors

    assert spec.path is not None
    path, base = spec.path, spec.path.name.lower().removesuffix(".gz")
    if base.endswith(".kv"):
        raise DataError(KV_REFUSED.format(path=path))
    is_text = base.endswith((".txt", ".vec"))
    try:
        if base.endswith(".bin"):
            kv = KeyedVectors.load_word2vec_format(str(path), binary=True)
        elif is_text:
            kv = KeyedVectors.load_word2vec_format(str(path), binary=False, no_header=_text_header(path) is None)
        else:
            raise DataError(f"vector file {path}: unknown format; use .bin, .txt, .vec or .npy (+ .vocab.txt).")
    except DataError:
        raise
    except Exception as err:
        detail = _diagnose_text(path) if is_text else str(err)
        raise DataError(
            f"vector file {path} is malformed: {detail} ({type(err).__name__}: {err}). Every line must be "
            f"'word v1 ... vD' with the same D (word2vec text may start with a 'count D' header)."
        ) from None
    if not isinstance(kv, KeyedVectors):
        raise DataError(f"{path} holds a {type(kv).__name__}, not gensim KeyedVectors.")
    return kv


def _load_gensim(spec: VectorSpec) -> Any:
    from gensim.models import KeyedVectors

    try:
        import gensim.downloader as api

        kv = api.load(spec.text)
    except Exception as err:
        raise DataError(
            f"could not load gensim-data vectors {spec.text!r} ({type(err).__name__}: {err}). "
            f"gensim.downloader needs network access the first time (files go to ~/gensim-data). "
            f"Offline, use glove50 (shipped), "
            f"a vector file path, or w2v:300."
        ) from None
    if not isinstance(kv, KeyedVectors):
        raise DataError(f"gensim-data {spec.text!r} is not a word-vector model.")
    return kv


def _stable_hash(text: str) -> int:
    """gensim seeds each start vector with hashfxn(word + seed); Python's hash is salted per process."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class _Sentences:
    """Re-iterable corpus for gensim (it makes one pass to count and one per epoch)."""

    def __init__(self, make: Callable[[], Iterable[list[str]]]) -> None:
        self.make = make

    def __iter__(self) -> Iterator[list[str]]:
        return iter(self.make())


def _train_w2v(spec: VectorSpec, sentences: Callable[[], Iterable[list[str]]], seed: int, progress: bool) -> Any:
    from gensim.models import Word2Vec
    from gensim.models.callbacks import CallbackAny2Vec
    from tqdm.auto import tqdm

    p = spec.params
    corpus = _Sentences(sentences)
    model = Word2Vec(
        vector_size=p["dim"],
        window=p["window"],
        min_count=p["min_count"],
        workers=p["workers"],
        seed=seed,
        hashfxn=_stable_hash,
        sg=0,
    )
    model.build_vocab(corpus_iterable=corpus)
    if not len(model.wv):
        raise DataError(f"{spec.text}: no word occurs min_count={p['min_count']} times in the training split.")
    bar = tqdm(total=p["epochs"], desc=f"word2vec {p['dim']}d", unit="epoch", disable=not progress)

    class _Tick(CallbackAny2Vec):  # type: ignore[misc]
        def on_epoch_end(self, model: Any) -> None:
            bar.update(1)

    try:
        model.train(corpus_iterable=corpus, total_examples=model.corpus_count, epochs=p["epochs"], callbacks=[_Tick()])
    finally:
        bar.close()
    return model.wv


def load_vectors(
    spec: VectorSpec,
    *,
    sentences: Callable[[], Iterable[list[str]]],
    corpus_key: dict[str, Any],
    cache_root: Path,
    seed: int,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """KeyedVectors plus a JSON-able description. ``sentences``/``corpus_key`` are used by w2v only."""
    info: dict[str, Any] = {"spec": spec.text, "kind": spec.kind}
    if spec.kind == "npy":
        kv = _load_npy(spec)
        info["source"] = str(spec.path)
        info["name"] = "GloVe 6B 50d (shipped, restricted vocabulary)" if spec.text == GLOVE50 else spec.path.name
    elif spec.kind == "file":
        kv = _load_file(spec)
        info["source"], info["name"] = str(spec.path), spec.path.name  # type: ignore[union-attr]
    elif spec.kind == "gensim":
        kv = _load_gensim(spec)
        info["source"], info["name"] = f"gensim-data:{spec.text}", spec.text
    elif spec.kind == "random":
        kv = _random_vectors(spec.params["dim"], sentences, seed)
        info["source"], info["name"] = "random", f"random N(0, 1) {spec.params['dim']}d (seed {seed})"
    else:
        key = cache.cache_key({"w2v": spec.params, "seed": seed, "corpus": corpus_key})
        path = cache_root / "vectors" / f"w2v-{key[:20]}.pt"
        entry = cache.try_load(path)
        info.update(name=f"word2vec {spec.params['dim']}d trained on the training split", params=spec.params)
        info.update(source=str(path), cache_hit=entry is not None)
        if entry is not None:
            kv = _from_arrays(entry["words"].split("\n"), entry["vectors"].numpy())
        else:
            start = time.perf_counter()
            kv = _train_w2v(spec, sentences, seed, progress)
            info["train_seconds"] = round(time.perf_counter() - start, 2)
            words = list(kv.index_to_key)
            cache.atomic_save(
                {
                    "format": cache.FORMAT_VERSION,
                    "words": "\n".join(words),
                    "vectors": torch.from_numpy(kv.vectors),
                },
                path,
            )
    info["dim"], info["words"] = int(kv.vector_size), len(kv)
    return kv, info
