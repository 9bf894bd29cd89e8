"""The order in which one relaxation step updates the layers, shared by the exact path (`phi.EPNet.step`) and the
folded relaxation (`fast.folded`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def run_schedule(schedule: str, state: list, drive: Callable[[list, int], Any],
                 update: Callable[[list, int, Any], torch.Tensor],
                 all_drives: Callable[[list], list] | None = None) -> list:
    """One update of every layer (`EPNet.step`): `drive(state, n)` is ∂Φ/∂sⁿ, `update(state, n, drive)` the new
    layer n. "synchronous": every layer from the previous state (`all_drives(state)`, where given, takes all
    drives at once); "alternating": even layers first, then odd layers from the new even ones."""
    if schedule == "synchronous":
        drives = all_drives(state) if all_drives is not None else [drive(state, n) for n in range(len(state))]
        return [update(state, n, u) for n, u in enumerate(drives)]
    new = list(state)
    for parity in (0, 1):
        for n in range(parity, len(state), 2):
            new[n] = update(new, n, drive(new, n))
    return new
