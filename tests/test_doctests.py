"""Every `>>>` example in analog_ep/ and spiking_ep/ runs and shows what it says.

Modules are found by their source (any file with a `>>>` in it), not listed by hand: an example added
anywhere is tested from then on. Examples run with doctest's default options, in the module's globals.
"""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analog_ep", "spiking_ep")


def modules_with_examples() -> list[str]:
    """Dotted names of the package modules whose source holds a `>>>` (entry-point `__main__`s excluded)."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py" or ">>>" not in path.read_text(encoding="utf-8"):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = modules_with_examples()


def test_the_main_entry_points_have_examples():
    """The discovery finds the modules whose examples document the public face."""
    assert {"analog_ep", "analog_ep.models", "analog_ep.estimators", "analog_ep.dynamics", "analog_ep.gdu"} <= set(
        MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name: str):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner()
    report: list[str] = []
    tests = [t for t in doctest.DocTestFinder().find(module, name) if t.examples]
    for test in tests:
        runner.run(test, out=report.append)
    results = runner.summarize(verbose=False)
    assert results.attempted > 0, f"{name} holds '>>>' but doctest finds no example in its docstrings"
    assert results.failed == 0, "".join(report)
