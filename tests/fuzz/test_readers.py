"""Property-based fuzzing of every reader that takes a user's file or text.

Each reader, given random bytes, truncated files, wrong JSON/TOML types, huge lines or non-UTF-8, must either
return a valid result or raise one of our errors (a `SeqepError`: one line, says what to fix). Anything else (a
traceback, a hang, unbounded memory) is a failure. `make test` runs `FUZZ_EXAMPLES` inputs per reader;
`SEQEP_FUZZ_EXAMPLES=N` runs more (docs/reliability.md quotes such a run).
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analog_ep.data.sources import get_spec, validate_jsonl
from analog_ep.data.tokenizer import normalize, tokenize
from analog_ep.data.vectors import VectorSpec, _load_file, _load_npy, parse_vectors
from analog_ep.errors import SeqepError
from analog_ep.train.checkpoint import load_checkpoint, load_model, save_model
from analog_ep.train.config import RunConfig, apply_overrides, load_toml
from analog_ep.train.run_dir import read_jsonl

FUZZ_EXAMPLES = int(os.environ.get("SEQEP_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=not os.environ.get("SEQEP_FUZZ_EXAMPLES"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(["text", "label", "premise", "hypothesis", "gold_label", "sentence", "x"])
                          | st.text(max_size=6), json_values, max_size=5)


def clean(reader: Callable[..., Any], *args: Any) -> Any:
    """Run a reader: a result or a SeqepError are both fine; anything else propagates and fails the test."""
    try:
        return reader(*args)
    except SeqepError as err:
        assert str(err).strip(), "an error must say what is wrong"
        return err


def _write(tmp: Path, name: str, data: bytes) -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------- data files


@FUZZ
@given(data=st.binary(max_size=2048), gz=st.booleans(), task=st.sampled_from(["imdb", "snli"]))
def test_jsonl_reader_on_random_bytes(tmp_path, data, gz, task):
    path = _write(tmp_path, "train.jsonl.gz" if gz else "train.jsonl", gzip.compress(data) if gz else data)
    clean(validate_jsonl, path, get_spec(task))


@FUZZ
@given(lines=st.lists(records | json_values, min_size=0, max_size=6), cut=st.integers(0, 4096),
       task=st.sampled_from(["imdb", "snli"]))
def test_jsonl_reader_on_wrong_types_and_truncated_gzip(tmp_path, lines, cut, task):
    text = "\n".join(json.dumps(r) for r in lines).encode()
    clean(validate_jsonl, _write(tmp_path, "a.jsonl", text), get_spec(task))
    packed = gzip.compress(text)
    clean(validate_jsonl, _write(tmp_path, "b.jsonl.gz", packed[: cut % (len(packed) + 1)]), get_spec(task))


def test_jsonl_reader_refuses_a_huge_line_without_reading_it_whole(tmp_path):
    """A 64 MB line (no newline) is refused by its length, not parsed (bounded memory)."""
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as fh:
        fh.write(b'{"text": "')
        fh.write(b"a" * (64 << 20))
    with pytest.raises(SeqepError, match="longer than"):
        validate_jsonl(path, get_spec("imdb"))


@FUZZ
@given(text=st.text(max_size=400) | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")))
def test_tokenizer_on_any_text(text):
    tokens = tokenize(text)
    assert isinstance(normalize(text), str)
    assert all(isinstance(t, str) and t and not t.isspace() for t in tokens)


# ------------------------------------------------------------------------------------------ word vectors


@FUZZ
@given(data=st.binary(max_size=1024), suffix=st.sampled_from([".txt", ".vec", ".txt.gz", ".bin"]))
def test_vector_file_reader_on_random_bytes(tmp_path, data, suffix):
    payload = gzip.compress(data) if suffix.endswith(".gz") else data
    path = _write(tmp_path, "v" + suffix, payload)
    clean(_load_file, VectorSpec(str(path), "file", path=path))


@FUZZ
@given(rows=st.lists(st.tuples(st.text(max_size=6), st.lists(st.floats(width=32) | st.text(max_size=3),
                                                               max_size=4)), max_size=5),
       header=st.booleans())
def test_vector_text_reader_on_ragged_rows(tmp_path, rows, header):
    lines = [f"{len(rows)} 3"] if header else []
    lines += [" ".join([w] + [str(v) for v in vals]) for w, vals in rows]
    path = _write(tmp_path, "v.txt", "\n".join(lines).encode("utf-8", "surrogatepass"))
    clean(_load_file, VectorSpec(str(path), "file", path=path))


@FUZZ
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=3), vocab=st.binary(max_size=64),
       raw=st.booleans(), junk=st.binary(max_size=256))
def test_npy_vector_reader_on_bad_shapes_vocab_and_bytes(tmp_path, shape, vocab, raw, junk):
    npy = tmp_path / "m.npy"
    if raw:
        npy.write_bytes(junk)
    else:
        np.save(npy, np.zeros(shape, dtype=np.float32))
    (tmp_path / "m.vocab.txt").write_bytes(vocab)
    clean(_load_npy, VectorSpec(str(npy), "npy", path=npy))


def test_a_pickled_numpy_object_array_is_refused(tmp_path):
    npy = tmp_path / "obj.npy"
    np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "obj.vocab.txt").write_text("a\n")
    with pytest.raises(SeqepError):
        _load_npy(VectorSpec(str(npy), "npy", path=npy))


def test_a_gensim_kv_file_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "vectors.kv"
    path.write_bytes(b"\x80\x04not even a pickle")
    with pytest.raises(SeqepError, match="pickle"):
        _load_file(VectorSpec(str(path), "file", path=path))


@FUZZ
@given(text=st.text(max_size=40))
def test_vector_source_parser_on_any_text(tmp_path, text):
    clean(parse_vectors, text, tmp_path)


# ------------------------------------------------------------------------------------------ configs


@FUZZ
@given(data=st.binary(max_size=512) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_toml_config_loader_on_random_bytes(tmp_path, data):
    clean(load_toml, _write(tmp_path, "c.toml", data))


@FUZZ
@given(raw=st.dictionaries(st.sampled_from(["data", "model", "ep", "train"]) | st.text(max_size=5),
                           st.dictionaries(st.text(max_size=12), json_values, max_size=4) | json_values,
                           max_size=4))
def test_config_from_wrong_json_types(raw):
    clean(RunConfig.from_dict, raw)


@FUZZ
@given(overrides=st.lists(st.text(max_size=30), max_size=3))
def test_set_overrides_on_any_text(overrides):
    clean(apply_overrides, RunConfig(), overrides)


# ------------------------------------------------------------------------------ checkpoints and metrics


def _tiny_checkpoint_bytes() -> bytes:
    from tests.helpers import tiny_net

    buf = io.BytesIO()
    net = tiny_net("mlp", torch.float32)
    torch.save({"format": 1, "spec": net.spec.to_dict(),
                "model": {k: v.detach() for k, v in net.state_dict().items()}}, buf)
    return buf.getvalue()


VALID_CHECKPOINT = _tiny_checkpoint_bytes()


@FUZZ
@given(cut=st.integers(0, len(VALID_CHECKPOINT)), flip=st.integers(0, len(VALID_CHECKPOINT) - 1),
       junk=st.binary(max_size=512))
def test_checkpoint_loader_on_truncated_corrupt_and_random_files(tmp_path, cut, flip, junk):
    clean(load_model, _write(tmp_path, "cut.pt", VALID_CHECKPOINT[:cut]))
    flipped = bytearray(VALID_CHECKPOINT)
    flipped[flip] ^= 0xFF
    clean(load_model, _write(tmp_path, "flip.pt", bytes(flipped)))
    clean(load_checkpoint, _write(tmp_path, "junk.pt", junk))


@FUZZ
@given(spec=json_values, model=json_values, fmt=json_values)
def test_checkpoint_loader_on_wrong_structures(tmp_path, spec, model, fmt):
    path = tmp_path / "w.pt"
    torch.save({"format": fmt, "spec": spec, "model": model}, path)
    clean(load_model, path)


def test_a_valid_checkpoint_still_loads():
    """The fuzzed file is a real checkpoint: without corruption it loads (the fuzzing above is not vacuous)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "ok.pt", VALID_CHECKPOINT)
        net, _ = load_model(path)
        save_model(Path(tmp) / "again.pt", net)
        load_model(Path(tmp) / "again.pt")


@FUZZ
@given(data=st.binary(max_size=1024))
def test_metrics_reader_on_random_bytes(tmp_path, data):
    rows = read_jsonl(_write(tmp_path, "metrics.jsonl", data))
    assert all(isinstance(r, dict) for r in rows)


@FUZZ
@given(data=st.binary(max_size=512), header=st.binary(max_size=64))
def test_safetensors_weights_reader_on_random_bytes(tmp_path, data, header):
    from analog_ep.train.weights_io import load_weights

    clean(load_weights, _write(tmp_path, "a.safetensors", data))
    size = len(header).to_bytes(8, "little")
    clean(load_weights, _write(tmp_path, "b.safetensors", size + header + data))


@pytest.mark.parametrize("text", ["~0/", "~nosuchuser/vectors.txt"])
def test_vector_paths_with_an_unknown_home_are_a_clean_error(tmp_path, text):
    """Found by fuzzing: Path.expanduser raised RuntimeError for a user this machine does not have."""
    clean(parse_vectors, text, tmp_path)


def test_a_checkpoint_with_a_list_for_its_spec_is_a_clean_error(tmp_path):
    """Found by fuzzing: GraphSpec.from_dict raised KeyError on a spec that is not a mapping."""
    torch.save({"format": 1, "spec": [], "model": None}, tmp_path / "w.pt")
    with pytest.raises(SeqepError, match="does not match"):
        load_model(tmp_path / "w.pt")
