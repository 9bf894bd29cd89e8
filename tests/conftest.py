"""Fixtures shared by every test folder (helpers that are not fixtures live in tests/helpers.py)."""

import pytest
import torch

from analog_ep.phi import EPNet
from tests.helpers import TINY_VARIANTS, tiny_net


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
