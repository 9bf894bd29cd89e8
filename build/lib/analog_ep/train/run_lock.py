"""One process per run directory: `RUN_DIR/run.lock` names the process that writes the run.

Two trainers writing the same `--out` would interleave metrics.jsonl rows and overwrite each other's
checkpoints. The lock is a file created exclusively (O_EXCL) holding the owner's pid, host and process
start time; a lock whose process is gone (or whose pid now belongs to another process) is stale and
taken over. Within one process the lock is re-entrant (a run's entry point and its loop both take it).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from analog_ep.errors import ConfigError

LOCK_NAME = "run.lock"
_held: dict[Path, int] = {}  # lock files this process holds → how many times it took each


class RunLocked(ConfigError):
    """Another live process writes this run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid from its owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid())}


def read_owner(run_dir: str | Path) -> dict | None:
    """The lock's owner record, or None when there is no (readable) lock."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_stale(owner: dict) -> bool:
    """True when the recorded process is certainly gone: same host, and its pid is dead or started later."""
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    pid = int(owner.get("pid", -1))
    if not _alive(pid):
        return True
    started = _start_time(pid)
    return owner.get("start") is not None and started is not None and started != owner["start"]


def is_ours(owner: dict | None) -> bool:
    return owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def check_unlocked(run_dir: str | Path) -> None:
    """Raise RunLocked when a live process other than this one holds the run directory's lock."""
    owner = read_owner(run_dir)
    if owner is not None and not is_ours(owner) and not is_stale(owner):
        raise RunLocked(f"{run_dir} is being written by process {owner.get('pid')} on host {owner.get('host')} "
                        f"(its {LOCK_NAME}): wait for it to finish or stop it, or pick another --out. If that "
                        f"process is gone (another machine's cannot be checked from here), delete "
                        f"{Path(run_dir) / LOCK_NAME}")


def acquire(run_dir: str | Path) -> Path:
    """Take the run directory's lock (creating the directory); RunLocked when a live process holds it."""
    path = (Path(run_dir) / LOCK_NAME).resolve()
    if path in _held:
        _held[path] += 1
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.dumps(_owner_record())
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        check_unlocked(run_dir)
        owner = read_owner(run_dir)
        if owner is not None and not is_ours(owner):
            print(f"{run_dir}: taking over the lock of process {owner.get('pid')} on {owner.get('host')}, "
                  "which is no longer running", file=sys.stderr)
        tmp = path.with_name(f".{LOCK_NAME}.{os.getpid()}.tmp")
        tmp.write_text(record)
        os.replace(tmp, path)
        if not is_ours(read_owner(run_dir)):  # another process took it over at the same moment
            check_unlocked(run_dir)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(record)
    _held[path] = 1
    return path


def release(run_dir: str | Path) -> None:
    """Give the lock back (the last of this process's takes removes the file)."""
    path = (Path(run_dir) / LOCK_NAME).resolve()
    if path not in _held:
        return
    _held[path] -= 1
    if _held[path] == 0:
        del _held[path]
        if is_ours(read_owner(run_dir)):
            path.unlink(missing_ok=True)


@contextmanager
def held(run_dir: str | Path) -> Iterator[None]:
    """The run directory's lock for the duration of a `with` block."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)
