"""The paper's architectures as Φ graph specs. Every size is a keyword, so tests use tiny versions.

`**options` pass through to `GraphSpec`: attention, gamma, mask_padding, activation, init_gain, bias_offset.
"""

from __future__ import annotations

from analog_ep.errors import ConfigError
from analog_ep.phi import GraphSpec, Projection

SNLI_PROJECTIONS = (
    Projection(0, 1),  # premise queries, hypothesis keys: premise aligned to hypothesis
    Projection(1, 0),  # hypothesis aligned to premise
    Projection(0, 0),  # self-attention in the premise
    Projection(1, 1),  # self-attention in the hypothesis
)


def imdb(seq_len: int = 600, dim: int = 300, hidden: tuple[int, ...] = (1000, 40), num_classes: int = 2,
         **options) -> GraphSpec:
    """One projection layer with self-attention over the review → FC 1000 → 40 → 2 (γ = 1/√d)."""
    return GraphSpec(num_streams=1, seq_len=seq_len, dim=dim, layers=(*hidden, num_classes),
                     projections=(Projection(0, 0),), name="imdb", **options)


def snli(seq_len: int = 25, dim: int = 300, hidden: tuple[int, ...] = (400,), num_classes: int = 3,
         **options) -> GraphSpec:
    """Four projection layers (P→H, H→P, P→P, H→H), concatenated → FC 400 → 3 (γ = 0.16)."""
    options.setdefault("gamma", 0.16)
    return GraphSpec(num_streams=2, seq_len=seq_len, dim=dim, layers=(*hidden, num_classes),
                     projections=SNLI_PROJECTIONS, name="snli", **options)


def mlp(input_size: int = 784, hidden: tuple[int, ...] = (500,), num_classes: int = 10, **options) -> GraphSpec:
    """A plain layered EP network on a flat input (no projection layer): input is (B, 1, 1, input_size)."""
    return GraphSpec(num_streams=1, seq_len=1, dim=input_size, layers=(*hidden, num_classes), name="mlp", **options)


TINY = {
    "imdb": dict(seq_len=12, dim=8, hidden=(32, 10)),
    "snli": dict(seq_len=6, dim=8, hidden=(24,)),
    "mlp": dict(input_size=20, hidden=(24,), num_classes=3),
}

MODELS = {"imdb": imdb, "snli": snli, "mlp": mlp}


def build_spec(name: str, tiny: bool = False, **overrides) -> GraphSpec:
    """A model spec by name; `tiny=True` gives a seconds-sized version for tests and quick checks.

    Example:
        >>> import torch
        >>> from analog_ep import EPNet, build_spec
        >>> spec = build_spec("snli", tiny=True, bias_offset=1.0)      # premise and hypothesis, 6 tokens of 8
        >>> spec.num_streams, spec.seq_len, spec.dim, spec.layers, spec.num_projections
        (2, 6, 8, (24, 3), 4)
        >>> net = EPNet(spec, seed=0)                                   # the parameters of Φ
        >>> [tuple(s.shape) for s in net.zero_state(5)]                 # projections, FC 24, 3 classes
        [(5, 4, 6, 8), (5, 24), (5, 3)]
        >>> net.phi(net.prepare(torch.randn(5, 2, 6, 8)), net.zero_state(5)).shape   # Φ per sample
        torch.Size([5])
        >>> build_spec("imdb", hidden=(64,)).layers                     # any size is a keyword
        (64, 2)
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    kwargs = dict(TINY[name]) if tiny else {}
    kwargs.update(overrides)
    return factory(**kwargs)
