"""The shapes of one Φ graph: its input streams, projection layers and fully connected layers.

A `GraphSpec` is all either backend (analog `phi.EPNet`, spiking `spiking_ep`) needs to rebuild the same
network; `models` holds the paper's. Φ itself is in `phi`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from analog_ep.activations import get_activation


@dataclass(frozen=True)
class Projection:
    """A projection layer: queries built from input stream `query_stream`, keys = values = `key_stream`.

    With `GraphSpec.pool_queries = m > 0` the queries are instead m learned patterns (Hopfield pooling)
    and `query_stream` is unused.
    """

    query_stream: int
    key_stream: int


@dataclass(frozen=True)
class GraphSpec:
    """Shapes of one Φ graph. Everything the two backends need to rebuild the same network."""

    num_streams: int
    seq_len: int
    dim: int
    layers: tuple[int, ...]
    projections: tuple[Projection, ...] = ()
    attention: bool = True
    gamma: float | None = None  # Hopfield inverse temperature; None -> 1/sqrt(dim)
    mask_padding: bool = False
    pool_queries: int = 0  # > 0: m learned query patterns per projection (Hopfield pooling), not per token
    activation: str = "hard_sigmoid"
    schedule: str = "alternating"  # or "synchronous" (the reference code); see EPNet.step
    init_gain: float = 1.0
    input_scale: float = 1.0  # word vectors are multiplied by this before entering Φ
    bias_offset: float = 0.0  # added to initial biases: 1.0 starts units mid-range, off σ's kink at u = 0
    vocab_size: int = 0  # > 0: the word vectors are a parameter of Φ (a (vocab_size, embed_dim) table, learned)
    exact_match: bool = False  # with vocab_size: the net appends the pair-overlap channel after its lookup
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a graph needs at least one fully connected layer (the output)")
        if self.pool_queries < 0 or (self.pool_queries and not self.projections):
            raise ValueError("pool_queries must be ≥ 0 and needs at least one projection layer")
        if self.pool_queries and not self.attention:
            raise ValueError("pool_queries > 0 needs attention=True: without the Hopfield retrieval a pooled "
                             "layer never sees the tokens (ablate with pool_queries=0, attention=False)")
        if any(n <= 0 for n in self.layers) or min(self.num_streams, self.seq_len, self.dim) <= 0:
            raise ValueError(f"all sizes must be positive: {self}")
        for p in self.projections:
            if not (0 <= p.query_stream < self.num_streams and 0 <= p.key_stream < self.num_streams):
                raise ValueError(f"projection {p} refers to a stream outside 0..{self.num_streams - 1}")
        get_activation(self.activation)
        if self.vocab_size < 0 or (self.vocab_size and self.vocab_size < 3):
            raise ValueError(f"vocab_size must be 0 (word vectors given as inputs) or ≥ 3 (PAD, UNK and a word), "
                             f"got {self.vocab_size}")
        if self.exact_match and (not self.vocab_size or self.num_streams != 2 or self.dim < 2):
            raise ValueError("exact_match needs a learned embedding table (vocab_size > 0) and sentence pairs "
                             "(num_streams = 2)")
        if self.schedule not in ("alternating", "synchronous"):
            raise ValueError(f"schedule must be 'alternating' or 'synchronous', got {self.schedule!r}")

    @property
    def num_projections(self) -> int:
        return len(self.projections)

    @property
    def num_classes(self) -> int:
        return self.layers[-1]

    @property
    def hopfield_gamma(self) -> float:
        return self.gamma if self.gamma is not None else 1.0 / math.sqrt(self.dim)

    @property
    def embed_dim(self) -> int:
        """Width of the learned word vectors: the token width less the pair-overlap channel."""
        return self.dim - int(self.exact_match)

    @property
    def proj_len(self) -> int:
        """Rows of each projection layer: one per token, or one per learned query when pooling."""
        return self.pool_queries or self.seq_len

    @property
    def fc_input_size(self) -> int:
        if self.num_projections:
            return self.num_projections * self.proj_len * self.dim
        return self.num_streams * self.seq_len * self.dim

    @property
    def layer_names(self) -> list[str]:
        names = ["proj"] if self.num_projections else []
        return names + [f"fc{i + 1}" for i in range(len(self.layers) - 1)] + ["out"]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["projections"] = [[p.query_stream, p.key_stream] for p in self.projections]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GraphSpec:
        d = dict(d)
        d["layers"] = tuple(d["layers"])
        d["projections"] = tuple(Projection(*p) for p in d.get("projections", ()))
        return cls(**d)

