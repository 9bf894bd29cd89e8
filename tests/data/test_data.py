"""Dataset pipeline (analog_ep.data): unit tests on tiny synthetic files, then real-data checks.

Unit tests build a data folder shaped like ../shared/data in tmp_path (IMDB, SNLI and a 50-d vector pair
over a few dozen words). Real-data tests use SEQEP_DATA_DIR (set by .ci/run) or ../shared/data and are
skipped when neither exists; the IMDB and SNLI builds are shared by all of them (module-scoped).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from analog_ep.data import SequenceDataset, TaskData, embed_batch, load_task, resolve_data_dir
from analog_ep.data import sources as sources_mod
from analog_ep.data.tokenizer import tokenize
from analog_ep.errors import DataError
from tests.helpers import real_data_dir

# ------------------------------------------------------------------------------------------- fixtures

VEC_WORDS = (
    "the a an movie film was is it i great good terrible bad loved hated plot acting . , ! do n't 's "
    "not man woman dog plays sleeps runs outside inside sits testonly number 0 1 2 3 4 5 6 7 8 9"
).split()


def write_jsonl_gz(path: Path, records: list[dict] | list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return path


def imdb_records(n_per_class: int, extra: str = "") -> list[dict]:
    out = []
    for i in range(n_per_class):
        out.append(
            {
                "id": i,
                "text": f"A terrible movie, number {i % 10}.<br /><br />I hated it! zzkx {extra}",
                "label": 0,
            }
        )
    for i in range(n_per_class):
        out.append({"id": i, "text": f"A great film {i % 10}. I loved the plot and the acting {extra}", "label": 1})
    return out


SNLI_PAIRS = [
    ("A man plays outside.", "A man sleeps inside.", "contradiction"),
    ("A woman sits.", "A woman sits outside.", "neutral"),
    ("A dog runs outside.", "A dog runs.", "entailment"),
]


def snli_records(n: int, extra: str = "") -> list[dict]:
    return [
        {"premise": p, "hypothesis": f"{h} {extra}".strip(), "label": lab}
        for i in range(n)
        for p, h, lab in [SNLI_PAIRS[i % 3]]
    ]


def make_data(root: Path, dim: int = 50) -> Path:
    write_jsonl_gz(root / "imdb" / "train.jsonl.gz", imdb_records(10))
    write_jsonl_gz(root / "imdb" / "test.jsonl.gz", imdb_records(5, extra="testonly"))
    write_jsonl_gz(root / "snli" / "train_subset.jsonl.gz", snli_records(12))
    write_jsonl_gz(root / "snli" / "dev.jsonl.gz", snli_records(6))
    write_jsonl_gz(root / "snli" / "test.jsonl.gz", snli_records(6, extra="testonly"))
    vec = root / "vectors"
    vec.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(vec / "glove.6B.50d.imdb_snli.npy", rng.standard_normal((len(VEC_WORDS), dim)).astype(np.float32))
    (vec / "glove.6B.50d.imdb_snli.vocab.txt").write_text("".join(w + "\n" for w in VEC_WORDS), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests must not see the user's data or cache settings."""
    monkeypatch.delenv("SEQEP_DATA_DIR", raising=False)
    monkeypatch.delenv("SEQEP_CACHE_DIR", raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data(tmp_path / "data")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def load(data_dir: Path, cache_dir: Path, task: str = "imdb", **kw) -> TaskData:
    return load_task(task, data_dir=data_dir, cache_dir=cache_dir, progress=False, **kw)


def decode(task: TaskData, ids: torch.Tensor) -> list[str]:
    return [task.vocab[i] for i in ids.tolist() if i != 0]


# ------------------------------------------------------------------------------------------ tokeniser


def test_tokenizer_lowercases_strips_html_and_splits_clitics() -> None:
    assert tokenize("I DON'T like it's <br /><br />ending&amp;credits!") == [
        "i",
        "do",
        "n't",
        "like",
        "it",
        "'s",
        "ending",
        "&",
        "credits",
        "!",
    ]
    assert tokenize("Well-known U.S. film\u0096great \u2019twas") == [
        "well-known",
        "u.s",
        ".",
        "film",
        "great",
        "'",
        "twas",
    ]
    assert tokenize("Café, naïve") == ["café", ",", "naïve"]
    assert tokenize("   ") == []


def test_tokenizer_is_deterministic() -> None:
    text = "A <i>fine</i> film... Don't miss it!"
    assert tokenize(text) == tokenize(text) == ["a", "fine", "film", ".", ".", ".", "do", "n't", "miss", "it", "!"]


# ------------------------------------------------------------------------------- vocabulary and ids


def test_shapes_dtypes_and_contract(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir)
    assert isinstance(t, TaskData) and t.name == "imdb" and t.num_classes == 2
    assert t.class_names == ["negative", "positive"] and t.num_streams == 1 and t.max_len == 600
    for ds in (t.train, t.val, t.test):
        assert isinstance(ds, SequenceDataset)
        assert ds.ids.dtype == torch.int32 and ds.ids.shape[1:] == (1, 600)
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (len(ds),)
    assert t.embedding.dtype == torch.float32 and t.dim == 50 == t.embedding.shape[1]
    assert not t.embedding[:2].any(), "PAD and UNK rows must be zero"
    assert t.vocab[:2] == ["<pad>", "<unk>"] and len(t.vocab) == t.embedding.shape[0]
    json.dumps(t.info)  # JSON-serialisable
    assert t.info["vectors"]["dim"] == 50 and t.info["vocab"]["size"] == len(t.vocab)


def test_vocab_from_train_only(data_dir: Path, cache_dir: Path) -> None:
    """'testonly' has a vector and occurs in every test review but in no training review."""
    for oov in ("drop", "unk"):
        t = load(data_dir, cache_dir, oov=oov)
        assert "testonly" not in t.vocab
        test_tokens = {w for row in t.test.ids[:, 0] for w in decode(t, row)}
        assert "testonly" not in test_tokens
    assert (t.test.ids == 1).any(), "with oov=unk the test-only word becomes UNK"


def test_oov_drop_removes_and_unk_maps_to_zero_row(data_dir: Path, cache_dir: Path) -> None:
    drop = load(data_dir, cache_dir, oov="drop")
    unk = load(data_dir, cache_dir, oov="unk")
    assert drop.vocab == unk.vocab and "zzkx" not in drop.vocab  # no vector -> never in the vocabulary
    neg = int(torch.nonzero(drop.train.labels == 0)[0])
    words_drop = decode(drop, drop.train.ids[neg, 0])
    words_unk = decode(unk, unk.train.ids[neg, 0])
    assert words_drop == [
        "a",
        "terrible",
        "movie",
        ",",
        "number",
        words_drop[5],
        ".",
        "i",
        "hated",
        "it",
        "!",
    ]
    assert words_unk == [*words_drop, "<unk>"]
    assert not (drop.train.ids == 1).any()
    x = embed_batch(unk.train.ids[neg : neg + 1], unk.embedding)
    assert not x[0, 0, len(words_unk) - 1].any(), "UNK embeds to zero"


def test_padding_truncation_and_stats(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir, max_len=4, val_size=0)
    pos = int(torch.nonzero(t.train.labels == 1)[0])
    assert decode(t, t.train.ids[pos, 0]) == ["a", "great", "film", "0"]  # "A great film 0. I loved ..."
    assert t.info["truncation"]["train"]["fraction_truncated"] == 1.0
    long = load(data_dir, cache_dir, max_len=30, val_size=0)
    row = long.train.ids[pos, 0]
    n = int((row != 0).sum())
    assert (row[:n] != 0).all() and (row[n:] == 0).all(), "tokens left-aligned, then zeros"
    assert long.info["truncation"]["train"]["fraction_truncated"] == 0.0
    assert torch.equal(long.train.lengths[:, 0], (long.train.ids[:, 0] != 0).sum(-1))
    assert torch.equal(long.train.ids[:, :, :4], t.train.ids), "truncation keeps the first L tokens"


def test_min_freq_and_max_vocab(data_dir: Path, cache_dir: Path) -> None:
    full = load(data_dir, cache_dir, val_size=0)
    cut = load(data_dir, cache_dir, val_size=0, min_freq=11)  # each digit occurs twice, "a" 20 times
    assert set(cut.vocab) < set(full.vocab) and "7" in full.vocab and "7" not in cut.vocab
    top = load(data_dir, cache_dir, val_size=0, max_vocab=3)
    assert top.vocab[2:] == full.vocab[2:5] and top.embedding.shape == (5, 50)
    assert torch.equal(top.embedding[2:], full.embedding[2:5])


def test_embedding_rows_are_the_word_vectors(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir)
    matrix = np.load(data_dir / "vectors" / "glove.6B.50d.imdb_snli.npy")
    for i, w in enumerate(t.vocab[2:], start=2):
        assert np.array_equal(t.embedding[i].numpy(), matrix[VEC_WORDS.index(w)])


def test_embed_batch_zero_on_padding_and_dtype() -> None:
    emb = torch.randn(6, 3, dtype=torch.float64)
    emb[0] = 7.0  # even a corrupted PAD row must give exact zeros
    ids = torch.tensor([[[2, 3, 0, 0], [5, 0, 0, 0]]], dtype=torch.int32)
    x = embed_batch(ids, emb)
    assert x.shape == (1, 2, 4, 3) and x.dtype == torch.float64
    assert torch.equal(x[0, 0, 0], emb[2]) and torch.equal(x[0, 1, 0], emb[5])
    assert (x[ids == 0] == 0).all()
    with pytest.raises(TypeError):
        embed_batch(ids.float(), emb)


def test_val_carve_and_limits_are_stratified_and_seeded(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir, val_size=0.2)
    assert (len(t.train), len(t.val), len(t.test)) == (16, 4, 10)
    assert t.val.labels.bincount().tolist() == [2, 2] and t.info["splits"]["val"]["carved_from_train"]
    counted = load(data_dir, cache_dir, val_size=6, seed=1)
    assert len(counted.val) == 6 and counted.val.labels.bincount().tolist() == [3, 3]
    lim = load(data_dir, cache_dir, train_limit=5, eval_limit=4)
    assert (len(lim.train), len(lim.val), len(lim.test)) == (5, 2, 4)
    assert sorted(lim.train.labels.bincount().tolist()) == [2, 3] and lim.test.labels.bincount().tolist() == [
        2,
        2,
    ]
    assert lim.info["splits"]["train"]["limited_from"] == 18
    again = load(data_dir, cache_dir, train_limit=5, eval_limit=4, seed=0)
    assert torch.equal(again.train.ids, lim.train.ids)


def test_dataloader_and_distributed_sampler(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir, task="snli")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(t.train, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for ids, labels in DataLoader(t.train, batch_size=4, sampler=sampler):
            assert ids.shape[1:] == (2, 25) and ids.dtype == torch.int32 and labels.dtype == torch.int64
            seen.append(len(labels))
    assert sum(seen) == len(t.train)
    x = embed_batch(ids, t.embedding)
    assert x.shape == (*ids.shape, 50) and (x[ids == 0] == 0).all()


# ------------------------------------------------------------------------------------------------- SNLI


def test_snli_streams_labels_and_subset_flag(data_dir: Path, cache_dir: Path) -> None:
    t = load(data_dir, cache_dir, task="snli", val_size=0.5)
    assert t.num_streams == 2 and t.max_len == 25 and t.train.ids.shape == (12, 2, 25)
    assert t.class_names == ["entailment", "neutral", "contradiction"]
    assert t.train.labels[:3].tolist() == [2, 1, 0]
    assert decode(t, t.train.ids[0, 1]) == ["a", "man", "sleeps", "inside", "."]
    info = t.info
    assert info["train_is_subset"] and info["splits"]["train"]["source_split"] == "train_subset"
    assert "NOT the full split" in info["notes"][0] and "dev" in info["notes"][1]
    assert info["splits"]["val"]["source_split"] == "dev" and len(t.val) == 6  # val_size ignored
    assert info["limits"]["val_size"] is None


def test_snli_full_train_in_original_format_is_preferred(data_dir: Path, cache_dir: Path) -> None:
    """The original snli_1.0 jsonl (sentence1/sentence2/gold_label, '-' labels) can be dropped in as train."""
    rows = [
        {"sentence1": p, "sentence2": h, "gold_label": lab, "pairID": str(i)}
        for i, (p, h, lab) in enumerate(SNLI_PAIRS * 2)
    ]
    rows.append({"sentence1": "A man.", "sentence2": "A dog.", "gold_label": "-", "pairID": "x"})
    (data_dir / "snli" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    t = load(data_dir, cache_dir, task="snli")
    assert len(t.train) == 6 and not t.info["train_is_subset"]
    assert t.info["splits"]["train"]["source_split"] == "train"
    assert t.info["splits"]["train"]["dropped"] == {"no_gold_label": 1}


def test_hub_path_drops_minus_one_labels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No data dir: the hub is used. Its loader is replaced by in-memory datasets with ClassLabel features."""
    import datasets

    def fake_hub(hub_id: str, split: str) -> datasets.Dataset:
        assert hub_id == "stanfordnlp/snli"
        feats = datasets.Features(
            {
                "premise": datasets.Value("string"),
                "hypothesis": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
            }
        )
        rows = {
            "premise": ["A dog runs.", "A man plays.", "A woman sits."],
            "hypothesis": ["A dog runs outside.", "A man sleeps.", "A woman sits."],
            "label": [0, 2, -1],
        }
        return datasets.Dataset.from_dict(rows, features=feats)

    vec = tmp_path / "vec.txt"
    vec.write_text("".join(f"{w} {i}.0 1.0\n" for i, w in enumerate(VEC_WORDS)), encoding="utf-8")
    monkeypatch.setattr(sources_mod, "hub_reachable", lambda: True)
    monkeypatch.setattr(sources_mod, "_hub_load", fake_hub)
    t = load_task("snli", vectors=str(vec), cache_dir=tmp_path / "c", progress=False)
    assert len(t.train) == len(t.val) == len(t.test) == 2 and t.train.labels.tolist() == [0, 2]
    assert t.info["splits"]["train"]["dropped"] == {"no_gold_label": 1}
    assert t.info["source"] == {"hub": "stanfordnlp/snli"} and not t.info["train_is_subset"]
    assert t.dim == 2 and t.info["vectors"]["kind"] == "file"


# ------------------------------------------------------------------------------------------------ cache


def test_cache_hit_is_identical_and_skips_the_sources(
    data_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load(data_dir, cache_dir)
    assert first.info["cache_hit"] is False and Path(first.info["cache_path"]).is_file()

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a cache hit must not read the sources")

    monkeypatch.setattr(sources_mod, "read_local", boom)
    second = load(data_dir, cache_dir)
    assert second.info["cache_hit"] is True and second.info["cache_path"] == first.info["cache_path"]
    for a, b in [
        (first.train.ids, second.train.ids),
        (first.test.labels, second.test.labels),
        (first.embedding, second.embedding),
    ]:
        assert torch.equal(a, b)
    assert first.vocab == second.vocab
    assert second.info["build_seconds"] == first.info["build_seconds"]
    second.train.ids[0, 0, 0] = 12345  # mmap'd entries are copy-on-write: the file is not changed
    assert load(data_dir, cache_dir).train.ids[0, 0, 0] != 12345


def test_cache_key_follows_settings_and_file_content(data_dir: Path, cache_dir: Path) -> None:
    base = load(data_dir, cache_dir)
    other = load(data_dir, cache_dir, max_len=50)
    assert other.info["cache_path"] != base.info["cache_path"] and not other.info["cache_hit"]
    write_jsonl_gz(data_dir / "imdb" / "test.jsonl.gz", imdb_records(4))
    edited = load(data_dir, cache_dir)
    assert not edited.info["cache_hit"] and len(edited.test) == 8


def test_cache_write_is_atomic(data_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def crash(obj: object, f: object, *a: object, **k: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        load(data_dir, cache_dir)
    assert list((cache_dir / "tasks").iterdir()) == [], "no partial entry and no temp file left behind"
    monkeypatch.setattr(torch, "save", real_save)
    t = load(data_dir, cache_dir)
    assert [p.name for p in (cache_dir / "tasks").iterdir()] == [Path(t.info["cache_path"]).name]


def test_corrupt_cache_entry_is_rebuilt(data_dir: Path, cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = Path(load(data_dir, cache_dir).info["cache_path"])
    path.write_bytes(b"not a torch file")
    t = load(data_dir, cache_dir)
    assert not t.info["cache_hit"] and "unreadable cache entry" in caplog.text
    assert load(data_dir, cache_dir).info["cache_hit"]


def test_two_builds_are_identical(data_dir: Path, tmp_path: Path) -> None:
    a = load(data_dir, tmp_path / "c1", task="snli")
    b = load(data_dir, tmp_path / "c2", task="snli")
    assert not a.info["cache_hit"] and not b.info["cache_hit"]
    for role in ("train", "val", "test"):
        assert torch.equal(getattr(a, role).ids, getattr(b, role).ids)
        assert torch.equal(getattr(a, role).labels, getattr(b, role).labels)
    assert torch.equal(a.embedding, b.embedding) and a.vocab == b.vocab


def test_cache_dir_from_environment(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEQEP_CACHE_DIR", str(tmp_path / "envcache"))
    monkeypatch.setenv("SEQEP_DATA_DIR", str(data_dir))
    t = load_task("imdb", progress=False)
    assert Path(t.info["cache_path"]).parent.parent == tmp_path / "envcache"
    assert resolve_data_dir() == data_dir.resolve()


# ---------------------------------------------------------------------------------------------- vectors


def test_word2vec_is_trained_seeded_and_cached(data_dir: Path, tmp_path: Path) -> None:
    spec = "w2v:8,epochs=2,min_count=1"
    a = load(data_dir, tmp_path / "c1", vectors=spec)
    assert a.dim == 8 and a.info["vectors"]["cache_hit"] is False and "zzkx" in a.vocab  # trained on train
    b = load(data_dir, tmp_path / "c1", vectors=spec, max_len=20)  # new task entry, same word2vec entry
    assert b.info["vectors"]["cache_hit"] is True
    c = load(data_dir, tmp_path / "c2", vectors=spec)
    assert torch.equal(a.embedding, c.embedding) and a.vocab == c.vocab


def test_word2vec_is_reproducible_across_processes(data_dir: Path, tmp_path: Path) -> None:
    """Python's hash is salted per process; the pipeline must not depend on it."""
    code = (
        "import sys, hashlib; from analog_ep.data import load_task; "
        "t = load_task('imdb', data_dir=sys.argv[1], cache_dir=sys.argv[2], "
        "vectors='w2v:8,epochs=2,min_count=1', "
        "progress=False); print(hashlib.sha256(t.embedding.numpy().tobytes()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(data_dir), str(tmp_path / "sub")],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    local = load(data_dir, tmp_path / "here", vectors="w2v:8,epochs=2,min_count=1")
    assert out.stdout.strip().splitlines()[-1] == hashlib.sha256(local.embedding.numpy().tobytes()).hexdigest()


def test_vector_files_word2vec_text_glove_text_and_binary(data_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vector_size=4)
    kv.add_vectors(VEC_WORDS, np.arange(len(VEC_WORDS) * 4, dtype=np.float32).reshape(-1, 4))
    kv.save_word2vec_format(str(tmp_path / "w2v.txt"), binary=False)
    kv.save_word2vec_format(str(tmp_path / "w2v.bin"), binary=True)
    glove = tmp_path / "glove.txt"  # GloVe text: no header line
    glove.write_text("".join((tmp_path / "w2v.txt").read_text().splitlines(keepends=True)[1:]))
    results = [load(data_dir, cache_dir, vectors=str(tmp_path / name)) for name in ("w2v.txt", "w2v.bin", "glove.txt")]
    for t in results:
        assert t.dim == 4 and t.vocab == results[0].vocab
        assert torch.equal(t.embedding, results[0].embedding)
    i = results[0].vocab.index("movie")
    assert results[0].embedding[i].tolist() == kv["movie"].tolist()


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        ("fasttext-klingon-300", "unknown vectors 'fasttext-klingon-300'"),
        ("w2v:big", "cannot parse vectors 'w2v:big'"),
        ("w2v:300,colour=3", "cannot parse vectors"),
        ("/no/such/vectors.bin", "vector file /no/such/vectors.bin not found"),
    ],
)
def test_bad_vector_names(data_dir: Path, cache_dir: Path, vectors: str, message: str) -> None:
    with pytest.raises(DataError, match=message.replace(".", r"\.")):
        load(data_dir, cache_dir, vectors=vectors)


def test_vector_file_with_wrong_dimension(data_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("3 4\nthe 1 2 3 4\nmovie 1 2 3\ngreat 1 2 3 4\n")
    with pytest.raises(DataError, match=r"line 3 has 3 values where the header says 4"):
        load(data_dir, cache_dir, vectors=str(bad))
    glove = tmp_path / "bad_glove.txt"
    glove.write_text("the 1 2 3\nmovie 1 2 3 4 5\n")
    with pytest.raises(DataError, match=r"line 2 has 5 values where the first row says 3"):
        load(data_dir, cache_dir, vectors=str(glove))
    np.save(data_dir / "vectors" / "glove.6B.50d.imdb_snli.npy", np.zeros((len(VEC_WORDS), 300), np.float32))
    with pytest.raises(DataError, match=r"dimension 300, but 'glove50' means 50-d"):
        load(data_dir, cache_dir)
    np.save(data_dir / "vectors" / "glove.6B.50d.imdb_snli.npy", np.zeros((3, 50), np.float32))
    with pytest.raises(DataError, match=r"has 3 rows but .* lists \d+ words"):
        load(data_dir, cache_dir)


def test_gensim_download_failure_is_a_data_error(
    data_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gensim.downloader

    def offline(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(gensim.downloader, "load", offline)
    with pytest.raises(DataError, match=r"glove-wiki-gigaword-300.*needs network access.*glove50"):
        load(data_dir, cache_dir, vectors="glove-wiki-gigaword-300")


def test_glove50_without_data_dir(cache_dir: Path) -> None:
    with pytest.raises(DataError, match=r"'glove50'.*no data dir is set.*w2v:300"):
        load_task("imdb", cache_dir=cache_dir, progress=False)


# ------------------------------------------------------------------------------------------- bad inputs


def _break(data_dir: Path, how: str) -> Path:
    """Damage imdb/train.jsonl.gz (or the layout) one way; return the path the message should name."""
    train = data_dir / "imdb" / "train.jsonl.gz"
    good = imdb_records(3)
    if how == "truncated":
        blob = train.read_bytes()
        train.write_bytes(blob[: len(blob) // 2])
    elif how == "not_gzip":
        train.write_text(json.dumps(good[0]) + "\n")
    elif how == "not_json":
        write_jsonl_gz(train, [json.dumps(good[0]), '{"text": "oops", "label": ', json.dumps(good[1])])
    elif how == "not_object":
        write_jsonl_gz(train, [json.dumps(good[0]), "[1, 2]"])
    elif how == "missing_field":
        write_jsonl_gz(train, [good[0], good[1], {"review": "no text field", "label": 1}])
    elif how == "unknown_label":
        write_jsonl_gz(train, [good[0], {"text": "meh", "label": 7}])
    elif how == "empty_text":
        write_jsonl_gz(train, [good[0], {"text": "   ", "label": 0}])
    elif how == "mixed_labels":
        write_jsonl_gz(train, [good[0], {"text": "fine", "label": "positive"}])
    elif how == "text_not_string":
        write_jsonl_gz(train, [good[0], {"text": 42, "label": 0}])
    elif how == "no_records":
        write_jsonl_gz(train, [])
    elif how == "missing_split":
        (data_dir / "imdb" / "test.jsonl.gz").unlink()
        return data_dir / "imdb"
    elif how == "missing_task_dir":
        for f in (data_dir / "imdb").iterdir():
            f.unlink()
        (data_dir / "imdb").rmdir()
        return data_dir
    return train


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", r"truncated or corrupt after line \d+.*verify\.py"),
        ("not_gzip", r"not a gzip file"),
        ("not_json", r"line 2: not valid JSON .*Each line must be one JSON object like"),
        ("not_object", r"line 2: a JSON list, not an object"),
        ("missing_field", r"line 3: no field 'text' \(fields: label, review\)"),
        ("unknown_label", r"line 2: unknown label 7; expected one of \['negative', 'positive'\]"),
        ("empty_text", r"line 2: empty 'text'"),
        ("mixed_labels", r"line 2: label is a str but earlier lines use ints"),
        ("text_not_string", r"line 2: field 'text' must be a string, not int"),
        ("no_records", r"no records"),
        (
            "missing_split",
            r"missing test split for imdb: none of test\.jsonl\.gz, test\.jsonl.*Expected layout",
        ),
        ("missing_task_dir", r"has no imdb/ folder\. Expected layout:\n  <data-dir>/imdb/train\.jsonl\.gz"),
    ],
)
def test_bad_input_gives_a_clear_data_error(data_dir: Path, cache_dir: Path, how: str, message: str) -> None:
    where = _break(data_dir, how)
    with pytest.raises(DataError, match=message) as err:
        load(data_dir, cache_dir)
    assert str(where) in str(err.value)


def test_unknown_snli_label(data_dir: Path, cache_dir: Path) -> None:
    write_jsonl_gz(
        data_dir / "snli" / "dev.jsonl.gz",
        [*snli_records(2), {"premise": "a", "hypothesis": "b", "label": "maybe"}],
    )
    with pytest.raises(DataError, match=r"dev\.jsonl\.gz, line 3: unknown label 'maybe'"):
        load(data_dir, cache_dir, task="snli")


def test_missing_data_dir(tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match=r"nope \(from the data_dir argument.*does not exist"):
        load(tmp_path / "nope", cache_dir)
    monkeypatch.setenv("SEQEP_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"from \$SEQEP_DATA_DIR"):
        resolve_data_dir()


def test_no_source_names_both_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dir() is None
    monkeypatch.setattr(sources_mod, "hub_reachable", lambda: False)
    with pytest.raises(DataError) as err:
        load_task("imdb", vectors="w2v:8", cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    for part in (
        "SEQEP_DATA_DIR",
        "--data-dir",
        "stanfordnlp/imdb",
        "<data-dir>/imdb/train.jsonl.gz",
        "not reachable",
    ):
        assert part in msg


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "mnist"}, "unknown task 'mnist'"),
        ({"oov": "zero"}, "oov must be one of"),
        ({"max_len": 0}, "max_len must be a positive integer"),
        ({"val_size": 1.5}, r"val_size=1\.5 is not a fraction"),
        ({"val_size": 40}, "val_size=40 must be a count between 0 and 19"),
        ({"train_limit": -3}, "train_limit must be a positive integer"),
    ],
)
def test_bad_arguments(data_dir: Path, cache_dir: Path, kwargs: dict, message: str) -> None:
    kwargs = {"task": "imdb", **kwargs}
    with pytest.raises(DataError, match=message):
        load_task(data_dir=data_dir, cache_dir=cache_dir, progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_json_and_table(data_dir: Path, cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from analog_ep.cli import main

    args = ["data", "--task", "snli", "--data-dir", str(data_dir), "--cache-dir", str(cache_dir), "--quiet"]
    assert main([*args, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["val"]["size"] == 6 and info["vocab"]["size"] > 2 and info["dim"] == 50
    assert {"coverage", "truncation", "cache_path", "cache_hit", "build_seconds"} <= set(info)
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "train_subset" in table and "NOT the full split" in table and "coverage" in table
    assert main(["data", "--task", "imdb", "--data-dir", str(data_dir / "missing"), "--quiet"]) == 2
    assert "seqep data: error: data directory" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- real data


REAL = real_data_dir()


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture(scope="module")
def real_imdb(real_cache: Path) -> TaskData:
    return load_task("imdb", data_dir=REAL, cache_dir=real_cache, progress=False)


@pytest.fixture(scope="module")
def real_snli(real_cache: Path) -> TaskData:
    return load_task("snli", data_dir=REAL, cache_dir=real_cache, progress=False)


@pytest.mark.realdata
def test_real_imdb_counts(real_imdb: TaskData) -> None:
    t = real_imdb
    assert len(t.train) + len(t.val) == 25_000 and len(t.test) == 25_000
    assert (t.train.labels.bincount() + t.val.labels.bincount()).tolist() == [12_500, 12_500]
    assert t.test.labels.bincount().tolist() == [12_500, 12_500]
    assert len(t.val) == 2_500 and t.val.labels.bincount().tolist() == [1_250, 1_250]
    assert t.train.ids.shape == (22_500, 1, 600) and t.dim == 50
    assert t.info["coverage"] > 0.99
    assert 0.05 < t.info["truncation"]["test"]["fraction_truncated"] < 0.1


@pytest.mark.realdata
def test_real_imdb_vocab_has_no_test_only_token(real_imdb: TaskData) -> None:
    def tokens(split: str) -> set[str]:
        with gzip.open(REAL / "imdb" / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
            return {tok for line in fh for tok in tokenize(json.loads(line)["text"])}

    train, test = tokens("train"), tokens("test")
    vocab = set(real_imdb.vocab[2:])
    assert vocab <= train
    glove = set((REAL / "vectors" / "glove.6B.50d.imdb_snli.vocab.txt").read_text(encoding="utf-8").split("\n"))
    test_only_with_vector = (test - train) & glove
    assert len(test_only_with_vector) > 1000  # the check below is not vacuous
    assert not test_only_with_vector & vocab


@pytest.mark.realdata
def test_real_imdb_second_load_is_a_fast_cache_hit(real_imdb: TaskData, real_cache: Path) -> None:
    again = load_task("imdb", data_dir=REAL, cache_dir=real_cache, progress=False)
    assert again.info["cache_hit"] and again.info["load_seconds"] < 2.0
    assert torch.equal(again.test.ids, real_imdb.test.ids) and torch.equal(again.embedding, real_imdb.embedding)


@pytest.mark.realdata
def test_real_snli_counts_and_subset_flag(real_snli: TaskData) -> None:
    t = real_snli
    assert t.val.labels.bincount().tolist() == [3_329, 3_235, 3_278] and len(t.val) == 9_842
    assert t.test.labels.bincount().tolist() == [3_368, 3_219, 3_237] and len(t.test) == 9_824
    assert t.train.labels.bincount().tolist() == [6_667, 6_562, 6_771] and len(t.train) == 20_000
    assert t.info["train_is_subset"] and t.info["splits"]["train"]["source_split"] == "train_subset"
    assert t.info["splits"]["val"]["source_split"] == "dev"
    assert t.train.ids.shape == (20_000, 2, 25)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_imdb_w2v300_memory(tmp_path: Path) -> None:
    """Build IMDB at L=600 with 300-d word2vec in a fresh process; peak RSS must stay well under 2 GB."""
    code = (
        "import sys, json, resource; from analog_ep.data import load_task; "
        "t = load_task('imdb', data_dir=sys.argv[1], cache_dir=sys.argv[2], vectors='w2v:300', "
        "progress=False); rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps({'rss_mb': rss, 'dim': t.dim}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(REAL), str(tmp_path)], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dim"] == 300 and result["rss_mb"] < 1500


def test_exact_match_flags_mark_words_shared_by_the_pair():
    from analog_ep.data import embed_batch, exact_match_flags
    from analog_ep.embedding import PairFeatures

    ids = torch.tensor([[[5, 6, 7, 0], [7, 8, 5, 5]],  # premise 5 6 7, hypothesis 7 8 5 5
                        [[9, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.int32)  # empty hypothesis: nothing matches
    flags = exact_match_flags(ids.long()).squeeze(-1)
    assert flags.tolist() == [[[True, False, True, False], [True, False, True, True]],
                              [[False, False, False, False], [False, False, False, False]]]
    embedding = torch.randn(10, 3)
    x = embed_batch(ids, embedding, PairFeatures(exact_match=True))
    assert x.shape == (2, 2, 4, 4)
    assert torch.equal(x[..., :3], embed_batch(ids, embedding))
    assert torch.equal(x[..., 3], flags.float())
    with pytest.raises(ValueError, match="sentence pairs"):
        embed_batch(ids[:, :1], embedding, PairFeatures(exact_match=True))
