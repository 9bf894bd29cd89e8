"""Fixtures shared by every test folder (helpers that are not fixtures live in tests/helpers.py)."""

import os

import pytest
import torch

from analog_ep.phi import EPNet
from tests.helpers import TINY_VARIANTS, real_data_dir, tiny_net


def pytest_configure(config: pytest.Config) -> None:
    """Real-data tests find ../shared/data beside the clone without SEQEP_DATA_DIR, as `make test` does."""
    found = real_data_dir()
    if found is not None and not os.environ.get("SEQEP_DATA_DIR"):
        os.environ["SEQEP_DATA_DIR"] = str(found)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The one place a `realdata` test is skipped: no data folder on this machine."""
    if item.get_closest_marker("realdata") is not None and real_data_dir() is None:
        pytest.skip("no real data: set SEQEP_DATA_DIR, or put the shared data folder at ../shared/data")


@pytest.fixture(autouse=True)
def kernel_switches_restored():
    """Each test starts with the fused-kernel switches as the process had them: a test that enables them (an
    in-process `seqep train` or `bench`) must not change the arithmetic of the tests after it."""
    from analog_ep.fast import lowp_weights, retrieval

    saved = dict(retrieval._COMPILED), dict(lowp_weights._KERNELS)
    yield
    for live, kept in zip((retrieval._COMPILED, lowp_weights._KERNELS), saved):
        live.clear()
        live.update(kept)


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_net64(request) -> EPNet:
    """A tiny float64 network of each paper shape (and Hopfield pooling), units started mid-range."""
    return tiny_net(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread avoids thread-pool contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
