"""Ctrl-C and SIGTERM stop a training loop between two batches, so the checkpoint it writes is consistent.

A batch interrupted half-way (weights stepped, counters not) cannot be resumed exactly. So the first
SIGINT or SIGTERM only asks to stop: the loop finishes the batch in progress, then `StopRequest.check`
raises `Interrupted` and the trainer checkpoints and exits. A second signal abandons the batch at once
(plain KeyboardInterrupt): nothing more is saved, and a resume continues from the last checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal, raised between batches; `exit_code` is the shell's 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class StopRequest:
    signum: int | None = None

    def check(self) -> None:
        """Raise `Interrupted` if a stop was asked for (call where the training state is consistent)."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def stop_between_batches() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM handlers for the duration of a training loop (outside the main thread: none)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: object) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt  # second signal: abandon the batch now
        request.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this batch (send it again to stop at once, "
              "without saving it)", file=sys.stderr)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
