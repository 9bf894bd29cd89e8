"""On-disk cache of processed tasks: where it lives, how entries are keyed, atomic writes, fast reads.

An entry is one ``torch.save`` file named by a sha256 over everything that can change its content
(source file contents, tokeniser version, vocabulary settings, L, vectors, limits, seed). It is written to
a temporary file in the same folder and moved into place with ``os.replace``, so a crash or a concurrent
writer never leaves a half-written entry under the final name. Reads use ``mmap=True``: the id tensors
are paged in lazily and shared between processes (DataLoader workers, DDP ranks) through the page cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import DataError

CACHE_DIR_ENV = "SEQEP_CACHE_DIR"
FORMAT_VERSION = 1
HASH_LIMIT = 256 * 2**20  # files larger than this are identified by size + mtime instead of content

log = logging.getLogger(__name__)
_hash_memo: dict[tuple[str, int, int], str] = {}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The argument, else ``$SEQEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/seqep`` (``~/.cache/seqep``)."""
    if cache_dir is None or str(cache_dir) == "":
        cache_dir = os.environ.get(CACHE_DIR_ENV) or None
    if cache_dir is None:
        cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seqep"
    path = Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"cannot create cache directory {path} ({err.strerror or err}); set --cache-dir or "
            f"${CACHE_DIR_ENV} to a writable folder."
        ) from None
    return path


def file_identity(path: Path) -> dict[str, Any]:
    """What a cache key needs to know about one input file: its content hash (or size+mtime if huge).

    Content, not path, so a copied data folder reuses the cache and an edited file never does.
    """
    try:
        st = path.stat()
        ident: dict[str, Any] = {"name": path.name, "size": st.st_size}
        if st.st_size > HASH_LIMIT:
            ident["mtime_ns"] = st.st_mtime_ns
            return ident
        memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if memo_key not in _hash_memo:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(2**20), b""):
                    digest.update(block)
            _hash_memo[memo_key] = digest.hexdigest()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror or err}); check that it exists and is readable.") from None
    ident["sha256"] = _hash_memo[memo_key]
    return ident


def cache_key(payload: dict[str, Any]) -> str:
    """sha256 of a canonical JSON rendering of ``payload`` (plus the cache format version)."""
    blob = json.dumps({"format": FORMAT_VERSION, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then ``os.replace``: no partial file survives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def try_load(path: Path) -> dict[str, Any] | None:
    """The cached entry, or None when absent or unreadable (a bad entry is logged and rebuilt)."""
    if not path.is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # corrupt or from an incompatible torch: rebuild, never crash
        log.warning("ignoring unreadable cache entry %s (%s); rebuilding it", path, err)
        return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        log.warning("ignoring cache entry %s with an unknown format; rebuilding it", path)
        return None
    return obj
