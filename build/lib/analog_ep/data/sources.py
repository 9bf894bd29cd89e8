"""Where raw records come from: a local folder of ``.jsonl.gz`` files, or the Hugging Face hub.

Both are read through Hugging Face ``datasets`` (its ``json`` loader for local files) and end as the same
``RawSplit``, so nothing downstream knows which source it got. Local files are first checked line by line
with the stdlib, because a broken file should give a ``DataError`` naming the file, the line and the fix,
not an Arrow traceback from deep inside ``datasets``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import socket
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from analog_ep.errors import DataError

DATA_DIR_ENV = "SEQEP_DATA_DIR"
SUFFIXES = (".jsonl.gz", ".jsonl")


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """Everything task-specific: classes, text fields, file names, hub names."""

    name: str
    class_names: tuple[str, ...]
    streams: tuple[str, ...]  # text fields, in stream order
    default_max_len: int
    hub_id: str
    hub_splits: Mapping[str, str]  # role -> hub split name
    local_splits: Mapping[str, tuple[str, ...]]  # role -> file stems to try, first found wins
    example: str  # one valid line, for error messages
    field_aliases: Mapping[str, str] = field(default_factory=dict)  # other name -> our name
    skip_labels: tuple[Any, ...] = ()  # "no gold label" markers: dropped and counted, not errors

    @property
    def fields(self) -> tuple[str, ...]:
        return (*self.streams, "label")


TASKS: dict[str, TaskSpec] = {
    "imdb": TaskSpec(
        name="imdb",
        class_names=("negative", "positive"),
        streams=("text",),
        default_max_len=600,
        hub_id="stanfordnlp/imdb",
        hub_splits={"train": "train", "test": "test"},
        local_splits={"train": ("train",), "test": ("test",)},
        example='{"text": "A fine film.<br />Loved it.", "label": 1}',
    ),
    "snli": TaskSpec(
        name="snli",
        class_names=("entailment", "neutral", "contradiction"),
        streams=("premise", "hypothesis"),
        default_max_len=25,
        hub_id="stanfordnlp/snli",
        hub_splits={"train": "train", "val": "validation", "test": "test"},
        local_splits={"train": ("train", "train_subset"), "val": ("dev",), "test": ("test",)},
        example='{"premise": "A man plays.", "hypothesis": "A man sleeps.", "label": "contradiction"}',
        # the original snli_1.0_*.jsonl field names, so that file can be dropped in as train.jsonl
        field_aliases={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
        skip_labels=(-1, "-"),
    ),
}


@dataclass
class RawSplit:
    """One split as plain Python data: ``texts[s][i]`` is stream ``s`` of record ``i``."""

    role: str  # "train" | "val" | "test"
    source_split: str  # the file stem or hub split actually read, e.g. "train_subset", "dev"
    origin: str  # a path or "hub:<id>[<split>]"
    texts: list[list[str]]
    labels: np.ndarray  # int64 class indices
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: np.ndarray, role: str | None = None) -> RawSplit:
        """A subset (index order kept), optionally under another role name."""
        return RawSplit(
            role=role or self.role,
            source_split=self.source_split,
            origin=self.origin,
            texts=[[stream[i] for i in index] for stream in self.texts],
            labels=self.labels[index],
            dropped=dict(self.dropped),
        )


def get_spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise DataError(f"unknown task {task!r}: choose one of {', '.join(sorted(TASKS))}") from None


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The local data folder: the argument, else ``$SEQEP_DATA_DIR``, else None (use the hub).

    A folder that is named but missing is an error, never a silent fall-back to the network.
    """
    if data_dir is not None and str(data_dir) != "":
        origin = "the data_dir argument (--data-dir)"
    elif os.environ.get(DATA_DIR_ENV):
        data_dir, origin = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    else:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(
            f"data directory {path} (from {origin}) does not exist or is not a directory. Point it at a "
            f"folder laid out like ../shared/data (imdb/train.jsonl.gz, snli/dev.jsonl.gz, vectors/...), "
            f"or unset it to download from the Hugging Face hub."
        )
    return path.resolve()


def expected_layout(spec: TaskSpec) -> str:
    lines = []
    for role, stems in spec.local_splits.items():
        names = " or ".join(f"{stem}.jsonl.gz" for stem in stems)
        lines.append(f"  <data-dir>/{spec.name}/{names}   ({role})")
    lines.append(f"  one JSON object per line, e.g. {spec.example}")
    labels = ", ".join(f"{i}={n}" for i, n in enumerate(spec.class_names))
    lines.append(f"  label: the class name or its index ({labels}); plain .jsonl also accepted")
    return "\n".join(lines)


def locate_local_files(spec: TaskSpec, data_dir: Path) -> dict[str, tuple[str, Path]]:
    """role -> (source split name, file), or a DataError saying which file is missing."""
    task_dir = data_dir / spec.name
    if not task_dir.is_dir():
        raise DataError(f"{data_dir} has no {spec.name}/ folder. Expected layout:\n{expected_layout(spec)}")
    found: dict[str, tuple[str, Path]] = {}
    for role, stems in spec.local_splits.items():
        candidates = [task_dir / f"{stem}{suffix}" for stem in stems for suffix in SUFFIXES]
        hit = next((p for p in candidates if p.is_file()), None)
        if hit is None:
            raise DataError(
                f"missing {role} split for {spec.name}: none of {', '.join(p.name for p in candidates)} "
                f"in {task_dir}. Expected layout:\n{expected_layout(spec)}"
            )
        stem = hit.name.removesuffix(".gz").removesuffix(".jsonl")
        found[role] = (stem, hit)
    return found


# ---------------------------------------------------------------------------------------------- checks


def _label_ok(spec: TaskSpec, label: Any) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, int):
        return 0 <= label < len(spec.class_names)
    return isinstance(label, str) and label in spec.class_names


def _canonical(spec: TaskSpec, record: dict[str, Any]) -> dict[str, Any]:
    for alias, name in spec.field_aliases.items():
        if name not in record and alias in record:
            record[name] = record[alias]
    return record


MAX_LINE_BYTES = 16 << 20  # the longest real record is ~14 KB; a longer "line" is not a record, and is not read whole


def validate_jsonl(path: Path, spec: TaskSpec) -> int:
    """Read every line of a local split file; raise DataError at the first problem. Returns #records."""
    fix = f"Each line must be one JSON object like {spec.example}"
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno, records, label_kind = 0, 0, None
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_LINE_BYTES + 1), b""), 1):  # noqa: B007
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{path}, line {lineno}: longer than {MAX_LINE_BYTES >> 20} MB, so not one "
                                    f"record (is it one JSON document instead of one object per line?). {fix}")
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}, line {lineno}: not UTF-8 ({err.reason}). Re-save as UTF-8.") from None
                except json.JSONDecodeError as err:
                    snippet = raw[:80].decode("utf-8", "replace").rstrip()
                    raise DataError(
                        f"{path}, line {lineno}: not valid JSON ({err.msg}, column {err.colno}): {snippet!r}. {fix}"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}, line {lineno}: a JSON {type(record).__name__}, not an object. {fix}")
                record = _canonical(spec, record)
                for name in spec.fields:
                    if name not in record:
                        have = ", ".join(sorted(record)) or "none"
                        raise DataError(f"{path}, line {lineno}: no field {name!r} (fields: {have}). {fix}")
                label = record["label"]
                if label in spec.skip_labels:
                    continue
                if not _label_ok(spec, label):
                    raise DataError(
                        f"{path}, line {lineno}: unknown label {label!r}; expected one of "
                        f"{list(spec.class_names)} or an index 0..{len(spec.class_names) - 1}."
                    )
                kind = type(label).__name__
                if label_kind is not None and kind != label_kind:
                    raise DataError(
                        f"{path}, line {lineno}: label is a {kind} but earlier lines use {label_kind}s; "
                        f"use class names or indices throughout the file."
                    )
                label_kind = kind
                for name in spec.streams:
                    text = record[name]
                    if not isinstance(text, str):
                        raise DataError(
                            f"{path}, line {lineno}: field {name!r} must be a string, not {type(text).__name__}. {fix}"
                        )
                    if not text.strip():
                        raise DataError(f"{path}, line {lineno}: empty {name!r}. Remove the line or fill in the text.")
                records += 1
    except gzip.BadGzipFile:
        raise DataError(f"{path}: not a gzip file. Compress it with gzip, or rename it to .jsonl.") from None
    except (EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: the gzip stream is truncated or corrupt after line {lineno} ({err}). Copy the file "
            f"again (the data README lists sizes and sha256; `python3 verify.py` checks them)."
        ) from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err}).") from None
    if records == 0:
        raise DataError(f"{path}: no records. {fix}")
    return records


# --------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _hf_progress(enabled: bool) -> Iterator[None]:
    """Show or hide the `datasets` progress bars for the duration of one load, then restore them."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


def _to_raw(ds: Any, spec: TaskSpec, role: str, source_split: str, origin: str, drop_empty: bool) -> RawSplit:
    """A `datasets.Dataset` -> RawSplit: field aliases, label names -> indices, skip labels dropped."""
    columns = set(ds.column_names)
    for alias, name in spec.field_aliases.items():
        if name not in columns and alias in columns:
            ds = ds.rename_column(alias, name)
            columns = set(ds.column_names)
    missing = [name for name in spec.fields if name not in columns]
    if missing:
        raise DataError(f"{origin}: no column(s) {missing} (columns: {sorted(columns)}).")
    feature = ds.features["label"]
    hub_names = getattr(feature, "names", None)
    if hub_names is not None and len(hub_names) != len(spec.class_names):
        raise DataError(f"{origin}: label classes {hub_names}, expected {len(spec.class_names)} classes.")
    index = {name: i for i, name in enumerate(spec.class_names)}
    raw_labels = ds.data.column("label").to_pylist()
    texts = [ds.data.column(name).to_pylist() for name in spec.streams]
    keep: list[int] = []
    labels: list[int] = []
    dropped = {"no_gold_label": 0, "empty_text": 0}
    for i, label in enumerate(raw_labels):
        if label in spec.skip_labels:
            dropped["no_gold_label"] += 1
            continue
        if not _label_ok(spec, label):
            raise DataError(f"{origin}, record {i + 1}: unknown label {label!r}; expected {list(spec.class_names)}.")
        if any(not isinstance(stream[i], str) or not stream[i].strip() for stream in texts):
            if not drop_empty:
                raise DataError(f"{origin}, record {i + 1}: empty or missing text. Remove or fill in the record.")
            dropped["empty_text"] += 1
            continue
        keep.append(i)
        labels.append(index[label] if isinstance(label, str) else int(label))
    return RawSplit(
        role=role,
        source_split=source_split,
        origin=origin,
        texts=[[stream[i] for i in keep] for stream in texts],
        labels=np.asarray(labels, dtype=np.int64),
        dropped={k: v for k, v in dropped.items() if v},
    )


def read_local(
    spec: TaskSpec, files: Mapping[str, tuple[str, Path]], scratch: Path, progress: bool
) -> dict[str, RawSplit]:
    """Validate then load each local split through the `datasets` json loader.

    ``datasets`` writes an Arrow copy of every file it reads; it goes to a throw-away folder under
    ``scratch`` (our cache dir) and is deleted at once, since our own cache holds the processed result.
    """
    from datasets import load_dataset

    for _, path in files.values():
        validate_jsonl(path, spec)
    scratch.mkdir(parents=True, exist_ok=True)
    out: dict[str, RawSplit] = {}
    with tempfile.TemporaryDirectory(prefix="hf-json-", dir=scratch) as hf_cache, _hf_progress(progress):
        for role, (stem, path) in files.items():
            try:
                ds = load_dataset("json", data_files={stem: str(path)}, split=stem, cache_dir=hf_cache)
            except Exception as err:  # already validated, so this is unexpected: still no traceback
                raise DataError(f"{path}: Hugging Face datasets could not read it: {err}") from err
            out[role] = _to_raw(ds, spec, role, stem, str(path), drop_empty=False)
            del ds
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Fast network probe, so an offline machine gets an answer in seconds, not after minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True  # the user asked for the local hub cache: let `datasets` try it
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _hub_load(hub_id: str, split: str) -> Any:
    """One hub split (a seam for tests, which replace it with an in-memory dataset)."""
    from datasets import load_dataset

    return load_dataset(hub_id, split=split)


def no_source_error(spec: TaskSpec, reason: str) -> DataError:
    return DataError(
        f"no data for {spec.name}: {reason}. Either\n"
        f" (1) pass --data-dir / data_dir= or set ${DATA_DIR_ENV} to a local folder laid out as\n"
        f"{expected_layout(spec)}\n"
        f"     (../shared/data in this project's checkout is one), or\n"
        f" (2) run with network access so the Hugging Face hub copy {spec.hub_id} can be downloaded "
        f"(a copy already in the HF cache also works offline with HF_HUB_OFFLINE=1)."
    )


def read_hub(spec: TaskSpec, progress: bool) -> dict[str, RawSplit]:
    """Load every split from the hub; empty texts there are dropped and counted (not the user's file)."""
    if not hub_reachable():
        raise no_source_error(spec, "no local data folder was given and the Hugging Face hub is not reachable")
    out: dict[str, RawSplit] = {}
    with _hf_progress(progress):
        for role, split in spec.hub_splits.items():
            try:
                ds = _hub_load(spec.hub_id, split)
            except Exception as err:
                raise no_source_error(spec, f"loading {spec.hub_id} [{split}] from the hub failed ({err})") from err
            out[role] = _to_raw(ds, spec, role, split, f"hub:{spec.hub_id}[{split}]", drop_empty=True)
    return out
