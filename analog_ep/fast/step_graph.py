"""A relaxation step replayed as one CUDA graph: on a GPU, EP's steps are launch-bound, not arithmetic-bound.

At the paper's shapes a step is ~100 small kernels (products, softmax, clamps) of a few µs of GPU work each, so
the GPU waits on Python and the launches (imdb-paper batch 32 on an H100: ~1 ms a step, ~5 % of the chip).
Within one relaxation the step is the same function of the same shapes at every step: it is captured once on
static state buffers, and each later step is one graph launch. Nothing of the arithmetic changes.

`GraphedStep` runs the step's body (the new state, the residual ‖s_{t+1} − s_t‖_∞ on the device, the new state
copied over the old) in one of two modes: "capture" (CUDA: the first step runs eagerly on a side stream, which
also warms up lazy initialisation and compiled kernels, and the body is captured for the rest), or "static"
(the same buffers and body, run eagerly: any device; what the tests check against the plain loop). The step
must be a pure function of the state it is given, with no host synchronisation inside: true of `EPNet.step` on
the exact path and on the bf16 fast path on a GPU (the CPU int8 path's change products keep state across steps
and never run on a GPU).

Off by default until measured on a GPU: `SEQEP_CUDA_GRAPHS=1` (or `ENABLED = True`) turns it on for relaxations
whose state lives on a CUDA device; `experiments/gpu_probe.py --cuda-graphs both` measures it beside the plain
loop. A capture that fails (an operation that synchronises with the host) warns once and the relaxation goes on
eagerly, with the same numbers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

State = list[torch.Tensor]
MODES = ("off", "static", "capture")
ENABLED = os.environ.get("SEQEP_CUDA_GRAPHS", "0") == "1"
_warned = False


def default_mode(state: State) -> str:
    """"capture" where graphs are enabled and the state lives on a CUDA device, else "off"."""
    return "capture" if ENABLED and state and state[0].device.type == "cuda" else "off"


class GraphedStep:
    """`step` (state → new state) on static buffers: `run()` advances `state` in place by one step and leaves
    max |s_{t+1} − s_t| over layers `first:` in `residual` (a device scalar: reading it synchronises)."""

    def __init__(self, step: Callable[[State], State], state: State, first: int = 0, mode: str = "static") -> None:
        if mode not in ("static", "capture"):
            raise ValueError(f"mode must be 'static' or 'capture', got {mode!r}")
        self._step, self.first = step, first
        self.state = [s.clone() for s in state]
        wide = torch.float32
        for s in state:
            wide = torch.promote_types(wide, s.dtype)
        self.residual = torch.zeros((), dtype=wide, device=state[0].device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._pending = False  # capture mode: the first `run` only reports the warm-up step already taken
        if mode == "capture":
            self._capture()

    def _body(self) -> None:
        new = self._step(self.state)
        # each layer's move in its own dtype, as the plain loop measures it
        moves = [(a - b).abs().amax().to(self.residual.dtype)
                 for a, b in zip(new[self.first:], self.state[self.first:])]
        self.residual.copy_(torch.stack(moves).amax())
        for s, n in zip(self.state, new):
            s.copy_(n)

    def _capture(self) -> None:
        """Take the first step eagerly on a side stream (lazy initialisation and compilation happen there, outside
        the capture), then capture the body for the later steps; on failure stay eager."""
        global _warned
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._pending = True
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._body()
        except RuntimeError as err:  # e.g. a host synchronisation inside the step: it is not capturable
            if not _warned:
                warnings.warn(f"CUDA graph capture of the relaxation step failed ({err}); relaxing without graphs",
                              RuntimeWarning, stacklevel=3)
                _warned = True
            torch.cuda.synchronize()
            return
        self.graph = graph

    def run(self) -> None:
        """One step: the warm-up step already taken (first call after a capture), a graph replay, or the body."""
        if self._pending:
            self._pending = False
        elif self.graph is not None:
            self.graph.replay()
        else:
            self._body()
