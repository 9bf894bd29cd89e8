import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from analog_ep.models import build_spec  # noqa: E402
from analog_ep.phi import EPNet  # noqa: E402

TINY_VARIANTS = {
    "imdb": dict(model="imdb"),
    "snli": dict(model="snli"),
    "mlp": dict(model="mlp"),
    "imdb_pooled": dict(model="imdb", pool_queries=3, mask_padding=True),
}


@pytest.fixture(params=sorted(TINY_VARIANTS))
def tiny_net64(request) -> EPNet:
    """A tiny float64 network of each paper shape (and Hopfield pooling), units started mid-range."""
    options = dict(TINY_VARIANTS[request.param])
    spec = build_spec(options.pop("model"), tiny=True, bias_offset=1.0, **options)
    return EPNet(spec, seed=0).double()


def random_inputs(spec, batch: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g, dtype=dtype)
    y = torch.randint(0, spec.num_classes, (batch,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one torch thread avoids thread-pool contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
