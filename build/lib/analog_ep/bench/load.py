"""CPU time other processes use while a measurement runs: on a 2-core machine it decides whether a timing
is valid, so every record carries it (`foreign_cores`), and a run can wait for an idle machine."""

from __future__ import annotations

import math
import os
import resource
import time


def _busy_seconds() -> float:
    """CPU-seconds all processes have spent busy (from /proc/stat), or NaN where unavailable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


class LoadMeter:
    """CPU used by *other* processes while a measurement runs, in cores (0 = we had the machine alone)."""

    def __enter__(self) -> LoadMeter:
        self.load_before = os.getloadavg()[0]
        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._t
        foreign = (_busy_seconds() - self._busy) - (_own_seconds() - self._own)
        self.foreign_cores = max(0.0, foreign / wall) if wall > 0 and not math.isnan(foreign) else float("nan")
        self.load_after = os.getloadavg()[0]

    def report(self) -> dict:
        return {"loadavg_1m_before": round(self.load_before, 2), "loadavg_1m_after": round(self.load_after, 2),
                "foreign_cores": round(self.foreign_cores, 3)}


def foreign_load(seconds: float = 2.0) -> float:
    """Cores busy with other processes over the next `seconds` (we sleep meanwhile)."""
    with LoadMeter() as meter:
        time.sleep(seconds)
    return meter.foreign_cores


def wait_for_idle(max_cores: float, timeout: float, log=None) -> float:
    """Block until other processes use < max_cores (sampled over 3 s) or timeout; returns the last sample."""
    start = time.time()
    while True:
        busy = foreign_load(3.0)
        if busy < max_cores or time.time() - start > timeout:
            return busy
        if log:
            log(f"waiting for an idle machine: other processes use {busy:.2f} cores")
        time.sleep(10.0)
