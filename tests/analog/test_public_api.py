"""`analog_ep`'s public face: the names it promises, and an import that stays cheap."""

import subprocess
import sys

import pytest

import analog_ep


def test_every_public_name_imports_from_the_package():
    assert set(analog_ep.__all__) == {"__version__", *analog_ep._EXPORTS}
    from analog_ep import EPConfig, EPNet, GraphSpec, build_spec, make_estimator, relax  # noqa: F401

    for name in analog_ep.__all__:
        assert getattr(analog_ep, name) is not None, name
    assert analog_ep.relax is __import__("analog_ep.dynamics").dynamics.relax
    assert isinstance(analog_ep.__version__, str) and analog_ep.__version__
    assert set(analog_ep.__all__) <= set(dir(analog_ep))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'EPNett'"):
        analog_ep.EPNett  # noqa: B018
    with pytest.raises(ImportError):
        from analog_ep import EPNett  # noqa: F401


def imported_after(code: str) -> set[str]:
    """Modules a fresh interpreter has loaded after running `code`."""
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_importing_the_package_loads_nothing_heavy():
    """Every `import analog_ep.<module>` runs the package first: it must not pull torch or the native kernels."""
    loaded = imported_after("import analog_ep, analog_ep.errors")
    assert "torch" not in loaded and "analog_ep.phi" not in loaded


def test_the_public_names_do_not_load_the_native_kernels():
    loaded = imported_after("from analog_ep import EPConfig, EPNet, GraphSpec, build_spec, make_estimator, relax")
    assert "analog_ep.phi" in loaded
    assert not {"analog_ep.fast.native_kernels", "analog_ep.fast.amx_int8"} & loaded
