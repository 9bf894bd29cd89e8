"""Unit models of the spiking network, by name: one registry for our codings, the library adapters and yours.

`make_coding(name, **options)` builds a coding; `register_coding(name, factory)` adds your own (any
callable returning an object with the `Coding` methods), after which `to_spiking(net, coding=name)`,
`seqep convert --coding name` (when registered before the parser is built) and spiking.json accept it.
Each entry also says which attention winner rule suits it and whether it draws random numbers (it then
receives the network's `seed`).

Example:
    >>> coding_names()
    ('if', 'bernoulli', 'sigma_delta', 'snntorch', 'norse')
    >>> make_coding("sigma_delta", threshold=0.25).threshold
    0.25
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Twice(IFCoding):           # an IF unit that sees twice its input current
    ...     name: str = "twice"
    ...     def encode(self, rate, state):
    ...         return super().encode(2 * rate, state)
    >>> register_coding("twice", Twice)
    >>> make_coding("twice").name, "twice" in coding_names()
    ('twice', True)
    >>> unregister_coding("twice")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analog_ep.errors import ConfigError
from spiking_ep.units.adapters import NorseLIFCoding, SnntorchLeakyCoding
from spiking_ep.units.base import Coding, filter_trace, trace_alpha
from spiking_ep.units.neurons import BernoulliCoding, IFCoding, SigmaDeltaCoding

CodingFactory = Callable[..., Coding]


@dataclass(frozen=True)
class CodingEntry:
    """How to build one coding, and the defaults that go with it."""

    factory: CodingFactory
    attention: str = "herd"  # winner rule of the Hopfield layer: deterministic codings herd, stochastic ones sample
    seeded: bool = False  # the factory takes `seed` (the network's seed unless the options give one)


CODINGS: dict[str, CodingEntry] = {}


def register_coding(name: str, factory: CodingFactory, *, attention: str = "herd", seeded: bool = False,
                    replace: bool = False) -> None:
    """Make `name` a coding: `factory(**options)` returns the unit model (see `base.Coding`).

    attention: the default winner rule ("herd" for deterministic units, "sample" for stochastic ones;
    `to_spiking` checks it against `attention.ATTENTION_MODES`);
    seeded: pass the network's seed to the factory; replace: allow redefining an existing name.
    """
    if name in CODINGS and not replace:
        raise ConfigError(f"coding {name!r} is already registered; pass replace=True to redefine it")
    CODINGS[name] = CodingEntry(factory, attention, seeded)


def unregister_coding(name: str) -> None:
    """Remove a coding registered with `register_coding` (the shipped ones stay available to re-register)."""
    CODINGS.pop(name, None)


def coding_names() -> tuple[str, ...]:
    """Registered codings, in registration order (the shipped ones first)."""
    return tuple(CODINGS)


def coding_entry(name: str) -> CodingEntry:
    """The registry entry of `name`, or a ConfigError that lists the choices."""
    try:
        return CODINGS[name]
    except KeyError:
        raise ConfigError(f"unknown coding {name!r}; choose one of {', '.join(CODINGS)} "
                          "(or add yours with spiking_ep.units.register_coding)") from None


def make_coding(name: str, **options: Any) -> Coding:
    """The coding `name` built with `options` (e.g. threshold for sigma-delta, v0 for IF, beta for snntorch)."""
    entry = coding_entry(name)
    try:
        coding = entry.factory(**options)
    except TypeError as err:
        raise ConfigError(f"bad options for coding {name!r}: {err}") from err
    if not isinstance(coding, Coding):
        raise ConfigError(f"the factory of coding {name!r} returned {type(coding).__name__}, which lacks the "
                          "Coding members (name, signed, init, encode, decode)")
    return coding


register_coding("if", IFCoding)
register_coding("bernoulli", BernoulliCoding, attention="sample", seeded=True)
register_coding("sigma_delta", SigmaDeltaCoding)
register_coding("snntorch", SnntorchLeakyCoding)  # the libraries are imported when a unit is built
register_coding("norse", NorseLIFCoding)

__all__ = [
    "CODINGS", "Coding", "CodingEntry", "CodingFactory", "coding_entry", "coding_names", "filter_trace",
    "make_coding", "register_coding", "trace_alpha", "unregister_coding",
]
