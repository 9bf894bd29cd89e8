"""Analog (rate-based) Equilibrium Propagation: one scalar primitive Φ, Hopfield attention.

The public face: the network (`EPNet`, `GraphSpec`, `build_spec`), the solver (`relax`) and the
gradient estimators (`EPConfig`, `make_estimator`, `register_estimator`). Names load on first use, so
`import analog_ep` (which every `import analog_ep.<module>` runs first) stays cheap: no torch, no native
kernels, until a name is asked for.

Example:
    >>> import torch
    >>> from analog_ep import EPConfig, EPNet, build_spec, make_estimator
    >>> net = EPNet(build_spec("imdb", tiny=True, bias_offset=1.0), seed=0)
    >>> x, y = torch.randn(4, 1, 12, 8), torch.tensor([0, 1, 1, 0])   # (batch, streams, L, d), labels
    >>> estimate = make_estimator("ep_symmetric", EPConfig(beta=0.1, free_steps=20, nudge_steps=5))(net, x, y)
    >>> all(p.grad is not None for p in net.parameters())                # ready for any torch optimizer
    True
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("seqep")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it (imported when the name is first used)
_EXPORTS = {
    "EPNet": "analog_ep.phi",
    "GraphSpec": "analog_ep.phi",
    "build_spec": "analog_ep.models",
    "relax": "analog_ep.dynamics",
    "EPConfig": "analog_ep.estimators",
    "Estimate": "analog_ep.estimators",
    "ESTIMATORS": "analog_ep.estimators",
    "make_estimator": "analog_ep.estimators",
    "register_estimator": "analog_ep.estimators",
    "SeqepError": "analog_ep.errors",
}

__all__ = [
    "EPNet", "GraphSpec", "build_spec", "relax", "EPConfig", "Estimate", "ESTIMATORS", "make_estimator",
    "register_estimator", "SeqepError", "__version__",
]  # = _EXPORTS and __version__ (tests/analog/test_public_api.py checks it)

if TYPE_CHECKING:
    from analog_ep.dynamics import relax
    from analog_ep.errors import SeqepError
    from analog_ep.estimators import ESTIMATORS, EPConfig, Estimate, make_estimator, register_estimator
    from analog_ep.models import build_spec
    from analog_ep.phi import EPNet, GraphSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'analog_ep' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
