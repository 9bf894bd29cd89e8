"""The network *is* its scalar primitive Φ: graph spec, parameters, and Φ's analytic gradients.

    Φ(X, s; θ) = Σ_p Σ_t ⟨W₀ᵖ x^{q(p)}_t, sᵖ_t⟩  +  Σ_n ⟨h^{n+1}, W_n a^n + b_n⟩

`sᵖ` are the projection layers (one d-vector per token, updated by a Hopfield retrieval whose query is
∂Φ/∂sᵖ), `h¹..h^N` the fully connected layers (h^N = output), `a⁰ = flat(s¹..s^P)` (or the flattened
input when there is no projection layer: a plain MLP) and `a^n = h^n` after that. Φ is bilinear in
states and weights, so ∂Φ/∂s and ∂Φ/∂θ are plain matrix products: no autograd graph is needed in the
relaxation loop. `analog_ep.reference` keeps an autograd path on Φ as the test oracle.

State layout used everywhere: a list of tensors, `[proj (B,P,L,d)]` (only if P > 0) followed by the FC
layers `(B, n_k)`; the last one is the output.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from analog_ep.activations import get_activation
from analog_ep.fast.lowp_weights import Bf16Weight, Int8Weight, enable_compiled_quantizers
from analog_ep.fast.retrieval import DistinctKeys, Query, enable_compiled
from analog_ep.hopfield import hopfield_retrieve

State = list[torch.Tensor]
LowPrecisionWeight = Bf16Weight | Int8Weight


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


PRECISIONS = ("fp32", "bf16", "int8")  # int8: bf16 path with the large FC products in int8
LOWP_MIN_WEIGHTS = 1 << 16  # synapses with fewer weights keep the parameters' dtype in the bf16 path


@dataclass
class LowPrecision:
    """bf16 operands of the large products for one batch (`EPNet.prepare(x, precision="bf16")`).

    The big synapses (≥ LOWP_MIN_WEIGHTS weights) and the Hopfield retrieval run on bf16 operands: oneDNN
    accumulates in fp32 (AMX / AVX-512 BF16) and rounds the result to bf16. Biases, the nudge, the FC
    layers' states and the EP contrast (∂Φ/∂θ) stay in the parameters' dtype; the projection states are
    bf16 in the free phase (they are outputs of a bf16 product, storing them wider adds no information).

    With attention the retrieval runs over each sequence's distinct keys (`fast_retrieval.DistinctKeys`,
    exact), and the constant half of the query, X W₀ᵀ, enters only through scores γ X W₀ᵀ Kᵀ computed
    once per batch: the per-step scores are those plus (W₁ᵀ h¹) (γK)ᵀ, and the (B, P, L, d) query is
    never formed.
    """

    dtype: torch.dtype
    weights: list[LowPrecisionWeight | None]  # W_k in low precision (`lowp_weights`), None where small
    keys: DistinctKeys | None  # the retrieval's keys, deduplicated, with its constant scores (attention only)
    query_drive: torch.Tensor | None  # (B,P,Lq,d) X W₀ᵀ (no attention only)
    flat_x: torch.Tensor | None  # (B, S·L·d) for graphs without projection layers
    base: DeltaBase | None = None  # set for the nudged phases (`EPNet.nudge_start`)

    def repeat(self, times: int) -> LowPrecision:
        if self.base is not None:
            raise ValueError("repeat the inputs before EPNet.nudge_start, not after")

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.cat([t] * times)

        keys = None if self.keys is None else self.keys.repeat(times)
        return LowPrecision(self.dtype, self.weights, keys, rep(self.query_drive), rep(self.flat_x))


@dataclass
class PairedProducts:
    """One state's two products with the first synapse (fast path): `down` = h W over `row_scale` (None: already
    whole) into the projection layer, `up` = a Wᵀ into FC-1."""

    down: torch.Tensor
    row_scale: torch.Tensor | None
    up: torch.Tensor

    def scaled_down(self) -> torch.Tensor:
        return self.down if self.row_scale is None else self.down.mul_(self.row_scale.to(self.down.dtype))


@dataclass
class DeltaBase:
    """The free fixed point s* that the fast path's nudged phases are written relative to.

    `up[k]` = W_k a*_k and `down[k]` = W_kᵀ h*_{k+1} in the parameters' dtype, for the synapses whose
    products the nudged steps take on differences; `retrieval` is softmax(γ Q* Kᵀ) (bf16, one tensor
    per group of `DistinctKeys`) with attention, Q* without. The EP signal lives in s − s*: everything
    differenced stays out of bf16 rounding.
    """

    states: State  # s*: FC layers one row per nudged row (params' dtype), projection once per sample (bf16)
    up: list[torch.Tensor | None]
    down: list[torch.Tensor | None]
    retrieval: list[torch.Tensor] | torch.Tensor | None


@dataclass
class Inputs:
    """Per-batch constants of the relaxation: computed once, reused at every step.

    `query_drive` (= X W₀ᵀ, the bottom-up half of ∂Φ/∂sᵖ) does not depend on the state, so it is
    computed once per batch instead of once per step. On the fast path (`lowp` set) the fp32 `keys` and
    `query_drive` are dropped once `lowp` holds what the steps read (memory), and the nudged phases' inputs
    keep `x_query` once per sample: `rows` then says how many rows the relaxation runs.
    """

    x_query: torch.Tensor | None  # (B,S,L,d) the input tokens; projection p reads stream query_streams[p]
    keys: torch.Tensor | None  # (B,P,L,d) Hopfield stored patterns (= values)
    key_mask: torch.Tensor | None  # (B,P,L) True = real token, only when masking padding
    query_drive: torch.Tensor | None  # (B,P,L,d), or (B,P,m,d) learned queries when pooling
    flat_x: torch.Tensor | None  # (B, S·L·d) for graphs without projection layers
    lowp: LowPrecision | None = None  # bf16 operands (precision="bf16"); None: the exact path
    rows: int | None = None  # rows of the relaxation's states, where the tensors above do not say it
    query_streams: tuple[int, ...] = ()  # the stream each projection's queries come from (() without them)

    @property
    def streams_in_order(self) -> bool:
        """Projection p reads stream p: `x_query` is already the (B,P,L,d) tokens, no gather needed."""
        return list(self.query_streams) == list(range(self.x_query.shape[1]))

    def query_tokens(self) -> torch.Tensor:
        """(B,P,L,d): the tokens each projection reads, gathered (a copy unless `streams_in_order`).
        Kept ungathered in `x_query`: SNLI's four projections read two streams, and a gathered copy held for
        the batch was 30 MB of the fast path's peak."""
        return self.x_query if self.streams_in_order else self.x_query[:, list(self.query_streams)]

    @property
    def batch_size(self) -> int:
        if self.rows is not None:  # always set with `lowp` (`prepare`, `nudge_start`)
            return self.rows
        t = self.keys if self.keys is not None else self.flat_x
        return t.shape[0]

    def repeat(self, times: int) -> Inputs:
        """The same inputs stacked `times` along the batch (for batched ±β phases)."""

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.repeat(times, *([1] * (t.dim() - 1)))

        tensors = (self.x_query, self.keys, self.key_mask, self.query_drive, self.flat_x)
        return Inputs(*(rep(t) for t in tensors), lowp=None if self.lowp is None else self.lowp.repeat(times),
                      rows=None if self.rows is None else self.rows * times, query_streams=self.query_streams)


class EPNet(nn.Module):
    """Parameters of a Φ graph plus its analytic derivatives. Pure tensor math, no autograd needed."""

    def __init__(self, spec: GraphSpec, seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        d, P = spec.dim, spec.num_projections
        pooled = spec.pool_queries > 0
        self.proj_weight = nn.Parameter(torch.empty(P, d, d)) if P and not pooled else None
        self.proj_query = nn.Parameter(torch.empty(P, spec.pool_queries, d)) if pooled else None
        sizes = [spec.fc_input_size, *spec.layers]
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(o, i)) for i, o in zip(sizes[:-1], sizes[1:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(o)) for o in sizes[1:]])
        self.activation = get_activation(spec.activation)
        self.reset_parameters(seed)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the per-batch caches behind: low-precision weights are rebuilt on demand,
        and int8 ones hold oneDNN's opaque packed tensors, which can be neither deep-copied nor pickled."""
        state = dict(super().__getstate__())
        state.pop("_lowp_cache", None)
        state.pop("_scratch_pool", None)
        return state

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self, seed: int | None = None) -> None:
        """nn.Linear's default init (uniform ±1/√fan_in, as the reference code), scaled by `init_gain`.

        `bias_offset` shifts the biases: with σ(u) = clamp(u/2, 0, 1) and the default init, pre-activations
        sit at σ's kink (u ≈ 0), where half the units are silent and finite-β EP crosses the kink.
        """
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        gain = self.spec.init_gain
        with torch.no_grad():
            for proj in (self.proj_weight, self.proj_query):
                if proj is not None:
                    bound = gain / math.sqrt(self.spec.dim)
                    proj.copy_(torch.rand(proj.shape, generator=gen) * 2 * bound - bound)
            for w, b in zip(self.weights, self.biases):
                bound = gain / math.sqrt(w.shape[1])
                w.copy_(torch.rand(w.shape, generator=gen) * 2 * bound - bound)
                b.copy_(torch.rand(b.shape, generator=gen) * 2 * bound - bound + self.spec.bias_offset)

    @property
    def param_layer(self) -> dict[str, str]:
        """Which layer each parameter feeds (for per-layer gradient reports)."""
        names = self.spec.layer_names
        out = {n: "proj" for n in ("proj_weight", "proj_query") if getattr(self, n) is not None}
        offset = 1 if self.spec.num_projections else 0
        for n in range(len(self.weights)):
            out[f"weights.{n}"] = names[offset + n]
            out[f"biases.{n}"] = names[offset + n]
        return out

    # ------------------------------------------------------------------ inputs and states
    def prepare(self, x: torch.Tensor, precision: str = "fp32",
                weights: list[LowPrecisionWeight | None] | None = None) -> Inputs:
        """Per-batch constants from embedded tokens x: (B, S, L, d).

        precision "fp32" (default): every product in the parameters' dtype (the exact path). "bf16": the
        large products run on bf16 operands (`Inputs.lowp`); see `LowPrecision`. "int8": the same, with the
        large FC products in int8 (`lowp_weights.Int8Weight`; CPU builds with oneDNN only).
        `weights`: low-precision weights built once by `low_precision_weights` for batches that share
        the same parameters (inference); by default they are rebuilt here, as training needs.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        inputs = self._prepare_exact(x)
        if precision != "fp32":
            inputs.lowp = self._low_precision_inputs(inputs, torch.bfloat16, precision, weights)
            inputs.keys = inputs.query_drive = None  # in `lowp` now; the exact path's alone would read them
            inputs.rows = x.shape[0]
        return inputs

    def _prepare_exact(self, x: torch.Tensor) -> Inputs:
        spec = self.spec
        expected = (spec.num_streams, spec.seq_len, spec.dim)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input must have shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = x.to(self.weights[0].dtype)
        if spec.input_scale != 1.0:
            x = x * spec.input_scale
        if not spec.num_projections:
            return Inputs(None, None, None, None, x.reshape(x.shape[0], -1))
        keys = x[:, [p.key_stream for p in spec.projections]]
        key_mask = (keys != 0).any(-1) if spec.mask_padding else None
        if self.proj_query is not None:  # Hopfield pooling: the query drive is the learned patterns
            return Inputs(None, keys, key_mask, self.proj_query.expand(x.shape[0], -1, -1, -1), None)
        streams = tuple(p.query_stream for p in spec.projections)
        query_drive = torch.einsum("bpld,ped->bple", x[:, list(streams)], self.proj_weight)
        return Inputs(x, keys, key_mask, query_drive, None, query_streams=streams)

    # ------------------------------------------------------------------ low precision (bf16 products)
    def low_precision_weights(self, kind: str = "bf16") -> list[LowPrecisionWeight | None]:
        """Low-precision copies of the large FC weights (None for small synapses), rebuilt on every call.

        kind "bf16": refreshed in place in buffers kept on the net (no new allocation: on a VM a fresh
        360 MB buffer costs more than the conversion itself); "int8": quantised and pre-packed anew
        (`lowp_weights.Int8Weight`). Not cached across calls: optimizers update parameters in place
        without always bumping their version counters (fused Adam does not), so a cache could silently
        serve stale weights. `release_low_precision()` frees them.
        """
        big = [w.numel() >= LOWP_MIN_WEIGHTS for w in self.weights]
        old = getattr(self, "_lowp_cache", None) or [None] * len(self.weights)
        if kind == "int8":
            self._lowp_cache = None
            # AMX buffers are refilled in place; anything else (oneDNN's packed copies) is freed before building
            old = [p if isinstance(p, Int8Weight) and p.kernel == "amx" else None for p in old]
            lows: list[LowPrecisionWeight | None] = [Int8Weight(w, previous=prev) if b else None
                                                     for w, prev, b in zip(self.weights, old, big)]
        elif kind == "bf16":
            lows = [Bf16Weight(w, prev) if b else None for w, prev, b in zip(self.weights, old, big)]
        else:
            raise ValueError(f"low-precision kind must be 'bf16' or 'int8', got {kind!r}")
        self._lowp_cache = lows
        return lows

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A reusable buffer that nobody else references (checked), else a new one kept for next time.

        For the fast path's largest per-batch outputs (the FC-1 gradient): reusing memory the process
        already owns avoids first-touch page faults that cost as much as the product itself on this VM.
        Up to two buffers per name (the caller may still hold the previous batch's result).
        """
        pool = self.__dict__.setdefault("_scratch_pool", {}).setdefault(name, [])
        for buf in pool:
            # free iff no C++ holder (e.g. as a .grad) and no Python holder besides the pool, `buf`, the call
            if buf.shape == shape and buf.dtype == dtype and buf._use_count() == 1 and sys.getrefcount(buf) <= 3:
                return buf
        buf = torch.empty(shape, dtype=dtype, device=self.weights[0].device)
        if len(pool) < 2:
            pool.append(buf)
        return buf

    def release_low_precision(self) -> None:
        """Drop the cached low-precision weight copies (memory; they are rebuilt on demand)."""
        self._lowp_cache = None

    def _low_precision_inputs(self, inputs: Inputs, dtype: torch.dtype, kind: str,
                              weights: list[LowPrecisionWeight | None] | None = None) -> LowPrecision:
        weights = weights if weights is not None else self.low_precision_weights(kind)
        keys = qd = flat_x = None
        if inputs.keys is not None:
            if self.spec.attention:
                keys = DistinctKeys.build(inputs.keys, inputs.key_mask, inputs.query_drive, self.spec.hopfield_gamma,
                                          dtype)
            else:
                qd = inputs.query_drive.to(dtype)
        if inputs.flat_x is not None and weights[0] is not None:
            flat_x = inputs.flat_x.to(dtype)
        return LowPrecision(dtype, weights, keys, qd, flat_x)

    def nudge_start(self, inputs: Inputs, free: State, times: int = 1) -> tuple[Inputs, State]:
        """Inputs and starting state of the nudged phase(s), `times` copies of the batch (2 for ±β).

        Exact path: `inputs.repeat(times)` and the free state stacked. Fast path (`inputs.lowp`): the
        nudged states are written relative to the free fixed point s* (`DeltaBase`; the projection state
        starts at δ = 0) and the s*-terms of the large products are computed here, once, in the params'
        dtype. Hand the final nudged state to `full_state` before taking ∂Φ/∂θ.
        """
        lp = inputs.lowp
        if lp is None:
            rep = inputs.repeat(times) if times > 1 else inputs
            return rep, [s.repeat(times, *([1] * (s.dim() - 1))) if times > 1 else s for s in free]

        def rep(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or times == 1 else torch.cat([t] * times)

        P = 1 if self.spec.num_projections else 0
        stacked = [rep(s) for s in free[P:]]  # the projection layer starts at δ = 0 (below)
        dtype = self.biases[0].dtype
        up: list[torch.Tensor | None] = [None] * len(self.weights)
        down: list[torch.Tensor | None] = [None] * len(self.weights)
        for k, w in enumerate(self.weights):
            n = k + P  # the FC layer synapse k feeds (state index)
            if n == 0:
                continue  # fed by the constant input
            from_proj = bool(P) and k == 0
            if lp.weights[k] is not None or from_proj:
                a = free[n - 1].reshape(free[n - 1].shape[0], -1).to(dtype)
                up[k] = torch.mm(a, w.t()).repeat(times, 1)
            if lp.weights[k] is not None and not from_proj:
                down[k] = torch.mm(free[n], w).repeat(times, 1)
        retrieval = None
        if P:
            q = self._low_precision_drive(inputs, free, 0)  # the query at s*, as the free phase computes it
            if self.spec.attention:
                retrieval = DistinctKeys.repeat_weights(lp.keys.attention(q), times)
            else:
                retrieval = rep(q)
            delta_shape = (free[0].shape[0] * times, *free[0].shape[1:])
            stacked.insert(0, torch.zeros(delta_shape, dtype=lp.dtype, device=free[0].device))
        # the projection's s* once per sample (the contrast and `full_state` read it), the FC layers' per row
        base = DeltaBase(free[:P] + [rep(s) for s in free[P:]], up, down, retrieval)
        if times == 1:
            return replace(inputs, lowp=replace(lp, base=base)), stacked
        keys = None if lp.keys is None else lp.keys.repeat(times, constants=False)
        lowp = LowPrecision(lp.dtype, lp.weights, keys, None, rep(lp.flat_x), base)
        # only what the nudged steps and the ∂Φ/∂θ contrast read: no copies of the fp32 keys and query drive, and
        # x_query once (B rows: the contrast needs the free batch's); masks live in `lowp.keys` (its counts)
        rows = free[-1].shape[0] * times
        return Inputs(inputs.x_query, None, None, None, rep(inputs.flat_x), lowp, rows=rows,
                      query_streams=inputs.query_streams), stacked

    def full_state(self, inputs: Inputs, state: State) -> State:
        """Undo `nudge_start`'s difference form: s* + δ for the projection layer, in the params' dtype."""
        lp = inputs.lowp
        if lp is None or lp.base is None or not self.spec.num_projections:
            return state
        dtype = self.biases[0].dtype
        s_star = lp.base.states[0]
        if s_star.shape[0] != state[0].shape[0]:  # ±β copies of the batch: s* is stored once per sample
            s_star = s_star.repeat(state[0].shape[0] // s_star.shape[0], *([1] * (s_star.dim() - 1)))
        return [s_star.to(dtype) + state[0].to(dtype), *state[1:]]

    def _delta_projection(self, lp: LowPrecision, delta_q: torch.Tensor | Query) -> torch.Tensor:
        """δs¹ = s¹(Q* + δQ) − s¹(Q*) without forming either term in bf16 (nudged phase, fast path)."""
        if self.spec.attention:
            return lp.keys.delta_retrieve(lp.base.retrieval, delta_q)
        q = lp.base.retrieval.to(torch.float32)
        return (self.activation(q + delta_q.to(torch.float32)) - self.activation(q)).to(lp.dtype)

    def zero_state(self, batch: int) -> State:
        spec = self.spec
        dt, dev = self.weights[0].dtype, self.weights[0].device
        state = []
        if spec.num_projections:
            state.append(torch.zeros(batch, spec.num_projections, spec.proj_len, spec.dim, dtype=dt, device=dev))
        state.extend(torch.zeros(batch, n, dtype=dt, device=dev) for n in spec.layers)
        return state

    def _split(self, inputs: Inputs, state: State) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
        if self.spec.num_projections:
            proj, fc = state[0], state[1:]
            return proj, fc, proj.reshape(proj.shape[0], -1)
        return None, state, inputs.flat_x

    # ------------------------------------------------------------------ ∂Φ/∂s
    def layer_drive(self, inputs: Inputs, state: State, n: int) -> torch.Tensor:
        """∂Φ/∂s for layer n (state index): bottom-up `a W_nᵀ + b` plus top-down `h^{n+1} W_{n+1}`.

        Two matrix products per synapse per full step: one into each of the two layers it joins.
        With `inputs.lowp` the large products run on bf16 operands (see `_low_precision_drive`).
        """
        if inputs.lowp is not None:
            return self._low_precision_drive(inputs, state, n)
        P = 1 if self.spec.num_projections else 0
        if P and n == 0:
            top_down = torch.mm(state[1], self.weights[0]).view_as(state[0])
            return inputs.query_drive + top_down
        k = n - P  # index of the FC layer, and of the synapse that feeds it
        below = state[n - 1].reshape(state[n - 1].shape[0], -1) if n > 0 else inputs.flat_x
        drive = torch.addmm(self.biases[k], below, self.weights[k].t())
        if n + 1 < len(state):
            drive = torch.addmm(drive, state[n + 1], self.weights[k + 1])
        return drive

    def _low_precision_drive(self, inputs: Inputs, state: State, n: int,
                             paired: PairedProducts | None = None) -> torch.Tensor | Query:
        """`layer_drive` of the fast path. Large products on bf16 operands, the rest in the params' dtype.

        With attention the projection "drive" returned here is only the top-down half of the query,
        W₁ᵀh¹ (X W₀ᵀ enters through the constant scores of `LowPrecision.keys`). In the nudged phases
        (`lp.base` set, see `nudge_start`) every bf16 product is taken on the difference from the free fixed point s*,
        `W a = W a* + W (a − a*)`, with `W a*` computed once in the params' dtype: rounding is then
        relative to the small EP signal, not to the state, and the contrast s⁺ − s⁻ survives. The
        projection state is then stored as its difference δ from s*, and the projection drive is
        δQ = W₁ᵀ(h¹ − h¹*) (the rest of Q is folded into s*'s attention, `DeltaBase.retrieval`).
        """
        P = 1 if self.spec.num_projections else 0
        lp, base = inputs.lowp, inputs.lowp.base
        if P and n == 0:
            h = None if paired else (state[1] if base is None else state[1] - base.states[1])
            if self.spec.attention:  # a `Query`: the int8 product's row factors go into the scores
                if lp.weights[0] is not None:
                    top_down, row_scale = ((paired.down, paired.row_scale) if paired
                                           else lp.weights[0].down_row_scaled(h))
                    return Query(top_down.view(state[0].shape), row_scale)
                return Query(torch.mm(h, self.weights[0]).view(state[0].shape).to(lp.dtype))
            if lp.weights[0] is not None:
                top_down = (paired.scaled_down() if paired else lp.weights[0].down(h)).view(state[0].shape)
            else:
                top_down = torch.mm(h, self.weights[0]).view(state[0].shape).to(lp.dtype)
            if base is None:  # no attention: σ needs the whole query
                return top_down.add_(lp.query_drive)
            return top_down
        k = n - P
        bias, w_low = self.biases[k], lp.weights[k]
        if n == 0:  # the flattened input (no projection layer): constant, no delta needed
            drive = (w_low.up(lp.flat_x).to(bias.dtype).add_(bias) if w_low is not None
                     else torch.addmm(bias, inputs.flat_x, self.weights[k].t()))
        else:
            below = state[n - 1].reshape(state[n - 1].shape[0], -1)
            from_proj = P and n == 1
            if base is not None and (w_low is not None or from_proj):
                if not from_proj:  # FC state: full values, take the difference; projection: already δ
                    below = below - base.states[n - 1].reshape(below.shape)
                if w_low is None:
                    product = torch.mm(below.to(bias.dtype), self.weights[k].t())
                else:
                    product = paired.up if paired and from_proj else w_low.up(below)
                drive = product.to(bias.dtype).add_(base.up[k]).add_(bias)
            elif w_low is not None:
                drive = (paired.up if paired and from_proj else w_low.up(below)).to(bias.dtype).add_(bias)
            else:
                drive = torch.addmm(bias, below.to(bias.dtype), self.weights[k].t())
        if n + 1 < len(state):
            above, w_low = state[n + 1], lp.weights[k + 1]
            if w_low is None:
                drive = torch.addmm(drive, above, self.weights[k + 1])
            elif base is not None:
                drive = drive.add_(w_low.down(above - base.states[n + 1]).to(drive.dtype)).add_(base.down[k + 1])
            else:
                drive = drive.add_(w_low.down(above).to(drive.dtype))
        return drive

    def drives(self, inputs: Inputs, state: State) -> State:
        """∂Φ/∂s for every layer (no nudging), all from the same state."""
        if inputs.lowp is not None:
            paired = self._paired_products(inputs, state)
            return [self._low_precision_drive(inputs, state, n, paired) for n in range(len(state))]
        return [self.layer_drive(inputs, state, n) for n in range(len(state))]

    def _paired_products(self, inputs: Inputs, state: State) -> PairedProducts | None:
        """Both products of the projection → FC-1 synapse from one state (fast path), which the int8 kernels
        take in one read of the 180 M-weight matrix; None where there is no such low-precision synapse."""
        lp = inputs.lowp
        if not self.spec.num_projections or lp.weights[0] is None:
            return None
        h = state[1] if lp.base is None else state[1] - lp.base.states[1]
        x = state[0].reshape(state[0].shape[0], -1)
        absmax = None if lp.keys is None else lp.keys.row_absmax(state[0])  # known if the retrieval made state[0]
        return PairedProducts(*lp.weights[0].down_up(h, x, absmax))

    def phi(self, inputs: Inputs, state: State) -> torch.Tensor:
        """Φ per sample (B,), on the exact path's inputs (`prepare(x)`)."""
        P = 1 if self.spec.num_projections else 0
        if P and inputs.query_drive is None:
            raise ValueError("Φ is evaluated from the exact path's inputs: net.prepare(x), without precision")
        total = 0.0
        if P:
            total = (state[0] * inputs.query_drive).flatten(1).sum(-1)
        for n in range(P, len(state)):
            k = n - P
            below = state[n - 1].reshape(state[n - 1].shape[0], -1) if n > 0 else inputs.flat_x
            below = below.to(self.biases[k].dtype)
            total = total + (state[n] * torch.addmm(self.biases[k], below, self.weights[k].t())).sum(-1)
        return total

    def update_layer(
        self,
        inputs: Inputs,
        state: State,
        n: int,
        drive: torch.Tensor,
        beta: float | torch.Tensor = 0.0,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New state of layer n from its drive: Hopfield retrieval (projection) or σ(drive + nudge)."""
        if self.spec.num_projections and n == 0:
            lp = inputs.lowp
            if lp is not None and lp.base is not None:  # nudged phase of the fast path: δs¹ from δQ
                return self._delta_projection(lp, drive)
            if lp is not None and self.spec.attention:
                return lp.keys.retrieve(drive)
            if self.spec.attention:
                return hopfield_retrieve(drive, inputs.keys, self.spec.hopfield_gamma, inputs.key_mask)
            return self.activation(drive)
        if n == len(state) - 1 and target is not None:
            drive = drive + beta * (target - state[n])
        return self.activation(drive)

    def step(
        self,
        inputs: Inputs,
        state: State,
        beta: float | torch.Tensor = 0.0,
        target: torch.Tensor | None = None,
    ) -> State:
        """One update of every layer: s ← σ(∂Φ^β/∂s), projection layers by one Hopfield retrieval.

        schedule "synchronous" (the reference code): all layers from the previous state; it can lock
        into period-2 oscillations once weights grow. "alternating": even layers first, then odd layers
        from the new even ones. Layers only talk to neighbours, so this is exact block-coordinate ascent
        on the energy Φ − Σ‖sⁿ‖² (σ(u) = clamp(u/2, 0, 1) maximises ⟨s, u⟩ − s² on [0, 1]): no cycles,
        same fixed points, same cost. `beta` may be a float or a (B, 1) tensor (batched ±β phases).
        """
        if self.spec.schedule == "synchronous":
            drives = self.drives(inputs, state)
            return [self.update_layer(inputs, state, n, u, beta, target) for n, u in enumerate(drives)]
        new = list(state)
        for parity in (0, 1):
            for n in range(parity, len(state), 2):
                new[n] = self.update_layer(inputs, new, n, self.layer_drive(inputs, new, n), beta, target)
        return new

    # ------------------------------------------------------------------ ∂Φ/∂θ
    def phi_param_grads(self, inputs: Inputs, state: State, coef: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ_b coef_b ∂Φ/∂θ(x_b, s_b), local Hebbian products.

        ∂Φ/∂W_n = h^{n+1} (a^n)ᵀ, ∂Φ/∂b_n = h^{n+1}, ∂Φ/∂W₀ᵖ = Σ_t sᵖ_t x_tᵀ. With `coef` = (+1…, −1…)
        over a stacked batch [s⁺; s⁻] the EP contrast is one matrix product per synapse.
        """
        proj, fc, fc_in = self._split(inputs, state)
        c = coef.to(fc[-1].dtype).view(-1, 1)
        if proj is not None and proj.dtype != c.dtype:  # bf16 projection states: contrast in the params' dtype
            proj = proj.to(c.dtype)
            fc_in = proj.reshape(proj.shape[0], -1)
        grads: dict[str, torch.Tensor] = {}
        if proj is not None:
            weighted = proj * c.view(-1, 1, 1, 1)
            if self.proj_query is not None:
                grads["proj_query"] = weighted.sum(0)
            else:
                grads["proj_weight"] = torch.einsum("bple,bpld->ped", weighted, inputs.query_tokens())
        bottoms = [fc_in, *fc[:-1]]
        for n, (h, a) in enumerate(zip(fc, bottoms)):
            hc = h * c
            grads[f"weights.{n}"] = torch.mm(hc.t(), a)
            grads[f"biases.{n}"] = hc.sum(0)
        return grads

    def symmetric_contrast(self, inputs: Inputs, nudged: State, scale: float) -> dict[str, torch.Tensor]:
        """scale · Σ_b [∂Φ/∂θ(s⁺_b) − ∂Φ/∂θ(s⁻_b)] for the ±β nudged states stacked as [s⁺; s⁻].

        `inputs`, `nudged` as `nudge_start(…, times=2)` and `relax` leave them. Exact path: the same
        numbers as `phi_param_grads` with coef = (+scale…, −scale…). Fast path: read from the difference
        form directly. With a± = a* + δ± the projection synapse's contrast is
        (h⁺ − h⁻) a*ᵀ + h⁺ δ⁺ᵀ − h⁻ δ⁻ᵀ, one bf16 product over the 3B rows [h⁺ − h⁻; h⁺; −h⁻] × [a*; δ⁺; δ⁻]
        in which every operand is rounded relative to its own size (and δ⁺ ≈ −δ⁻: nothing cancels);
        W₀'s contrast Σ_t (δ⁺ − δ⁻)_t x_tᵀ needs B rows, not 2B, and s* drops out exactly.
        """
        lp = inputs.lowp
        rows = nudged[-1].shape[0]
        half = rows // 2
        if lp is None or lp.base is None:
            return self.phi_param_grads(inputs, nudged, signed_coef(half, scale, nudged[-1]))
        dtype = self.biases[0].dtype
        P = 1 if self.spec.num_projections else 0
        grads: dict[str, torch.Tensor] = {}
        if P:
            diff = nudged[0][:half].to(dtype).sub_(nudged[0][half:])  # s⁺ − s⁻ of the projection layer, fp32
            if self.proj_query is not None:
                grads["proj_query"] = diff.sum(0).mul_(scale)
            else:
                # x_query: the free batch's B rows (`nudge_start`); per projection where streams repeat, so that
                # no gathered copy of the tokens is made
                x = inputs.x_query
                if inputs.streams_in_order:
                    grads["proj_weight"] = torch.einsum("bple,bpld->ped", diff, x).mul_(scale)
                else:
                    grads["proj_weight"] = torch.stack([torch.einsum("ble,bld->ed", diff[:, p], x[:, s])
                                                        for p, s in enumerate(inputs.query_streams)]).mul_(scale)
            del diff  # B × the projection layer in fp32: not held through the larger products below
        fc = nudged[P:]
        for k, h in enumerate(fc):
            hp, hm = h[:half], h[half:]
            grads[f"biases.{k}"] = (hp - hm).sum(0).mul_(scale)
            n = k + P
            if n == 0:  # the constant flattened input
                x = inputs.flat_x[:half]
                grads[f"weights.{k}"] = torch.mm((hp - hm).t(), x).mul_(scale)
            elif P and n == 1:  # from the projection layer, stored as δ from s*
                a_star = lp.base.states[0].reshape(half, -1)  # s* of the projection: once per sample
                deltas = nudged[0].reshape(rows, -1)
                if lp.weights[k] is not None:
                    left_t = torch.cat([hp - hm, hp, -hm]).mul_(scale).to(lp.dtype).t().contiguous()
                    out = self._scratch(f"weights.{k}", (left_t.shape[0], a_star.shape[1]), dtype)
                    # [a*; δ⁺; δ⁻] in bf16 one block of columns at a time: the whole (3B, a) operand (46 MB at
                    # SNLI) would be the batch's largest temporary, allocated late in the heap the process keeps
                    right = torch.empty(half + rows, CONTRAST_BLOCK, dtype=lp.dtype, device=a_star.device)
                    for lo in range(0, out.shape[1], CONTRAST_BLOCK):  # bf16 product, fp32 result in place
                        hi = min(lo + CONTRAST_BLOCK, out.shape[1])
                        block = right[:, :hi - lo]
                        block[:half].copy_(a_star[:, lo:hi])
                        block[half:].copy_(deltas[:, lo:hi])
                        out[:, lo:hi].copy_(torch.mm(left_t, block))
                    grads[f"weights.{k}"] = out
                else:
                    a_full = torch.cat([a_star, a_star]).to(dtype) + deltas.to(dtype)
                    signed = torch.cat([hp, -hm]).mul_(scale)
                    grads[f"weights.{k}"] = torch.mm(signed.t(), a_full)
            else:
                below = fc[k - 1]
                signed = torch.cat([hp, -hm]).mul_(scale)
                grads[f"weights.{k}"] = torch.mm(signed.t(), below)
        return {name: grads[name] for name, _ in self.named_parameters()}

    def named_param_dict(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


CONTRAST_BLOCK = 8192  # columns per block of the fast path's bf16 gradient product (fp32 output in place)


def enable_compiled_kernels(enabled: bool = True) -> None:
    """Use fused, one-pass versions of the fast path's softmax kernels.

    The free phase's scores-plus-softmax and the nudged phases' softmax difference
    (`fast_retrieval.delta_attention`) each become one pass over the scores. Where our C kernels load
    (`native_kernels`: AVX-512 with AMX, a C compiler) they are those, else `torch.compile`d ones (about 2×
    to 4× faster than torch's bf16 softmax; the first call compiles, ~10-40 s, then cached on disk by
    inductor). Off by default; `seqep bench` and `seqep train` turn it on. Results equal the eager kernels'
    up to fp32 rounding. Without our int8 kernels it also compiles the oneDNN int8 path's quantisers
    (`lowp_weights.enable_compiled_quantizers`).
    """
    enable_compiled(enabled)
    enable_compiled_quantizers(enabled)


def signed_coef(batch: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """(+scale … , −scale …): the contrast of two stacked half-batches."""
    c = torch.full((2 * batch,), scale, dtype=like.dtype, device=like.device)
    c[batch:] = -scale
    return c


def one_hot_target(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """The MSE target of the paper: ℓ = ½‖s^N − onehot(y)‖²."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).to(dtype)


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ½‖output − target‖²."""
    return 0.5 * ((output - target) ** 2).sum(-1).mean()
