"""Φ's operations on the CPU fast path: large products on low-precision operands, nudged phases in difference form.

`EPNet` (`analog_ep.phi`) hands each of its operations here, once, where `Inputs.lowp` is set
(`net.prepare(x, precision="bf16" | "int8")`); the exact path there is the oracle this one is tested against.
Two ideas make it fast and keep it faithful:

- Low-precision operands (`LowPrecision`). The big synapses (≥ LOWP_MIN_WEIGHTS weights) run on bf16
  operands, oneDNN accumulating in fp32 and rounding the result to bf16, or with int8 weights and
  activations (`lowp_weights`); the Hopfield retrieval runs on bf16 over each sequence's distinct keys
  (`retrieval.DistinctKeys`, exact). Biases, the nudge, the FC layers' states and ∂Φ/∂θ stay in the
  parameters' dtype.
- Difference form (`DeltaBase`). In the nudged phases every low-precision product is taken on the
  difference from the free fixed point s*, `W a = W a* + W (a − a*)`, with `W a*` computed once in the
  parameters' dtype: rounding is then relative to the small EP signal, not to the state, and the contrast
  s⁺ − s⁻ survives it.

One public function per operation of `EPNet` (`prepare`, `low_precision_weights`, `release_low_precision`,
`layer_drive`, `drives`, `update_projection`, `nudge_start`, `full_state`, `symmetric_contrast`), plus
`enable_compiled_kernels`; the private functions beside them are their parts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch

from analog_ep.fast import delta_int8, lowp_weights
from analog_ep.fast.delta_int8 import ChangeProducts
from analog_ep.fast.lowp_weights import Bf16Weight, Int8Weight, LowPrecisionWeight, enable_compiled_quantizers
from analog_ep.fast.retrieval import DistinctKeys, Query, enable_compiled
from analog_ep.state import Inputs, State

# `analog_ep.phi.EPNet`, whose operations dispatch here: not imported, since phi imports this module
EPNet = Any

# the first synapse's int8 products (AVX2 kernels) follow the codes that changed from step to step (`delta_int8`)
FOLLOW_CHANGES = True
# The free phase's last PLAIN_LAST steps round plainly (no dead band), and so does a free phase that may stop
# early: its final state s* is what the nudged phases are written relative to, and a band to the end moved the EP
# update from float64's by 2.9° where plain rounding gave 1.07° (the test network of tests/fast/test_delta_int8.py;
# plain for the last 2 steps: 1.12°, 5: 1.05°). The nudged phases keep their band (`delta_int8.BAND`, PAIRED_BAND).
PLAIN_LAST = 5
LOWP_MIN_WEIGHTS = 1 << 16  # synapses with fewer weights keep the parameters' dtype on the fast path
CONTRAST_BLOCK = 8192  # columns per block of the first synapse's bf16 gradient product (fp32 output in place)


@dataclass
class LowPrecision:
    """The fast path's operands for one batch (`prepare`).

    The projection states are bf16 in the free phase: they are outputs of a bf16 product, storing them wider
    adds no information. With attention the constant half of the query, X W₀ᵀ, enters only through scores
    γ X W₀ᵀ Kᵀ computed once per batch (`DistinctKeys.build`): the per-step scores are those plus
    (W₁ᵀ h¹) (γK)ᵀ, and the (B, P, L, d) query is never formed.
    """

    dtype: torch.dtype
    weights: list[LowPrecisionWeight | None]  # W_k in low precision (`lowp_weights`), None where small
    keys: DistinctKeys | None  # the retrieval's keys, deduplicated, with its constant scores (attention only)
    query_drive: torch.Tensor | None  # (B,P,Lq,d) X W₀ᵀ (no attention only)
    flat_x: torch.Tensor | None  # (B, S·L·d) for graphs without projection layers
    base: DeltaBase | None = None  # set for the nudged phases (`nudge_start`)
    # the first synapse's products from the codes that changed (`delta_int8`), and the retrieval they fed last:
    # both follow one relaxation (set on its first step, never carried into another phase's `LowPrecision`)
    changes: ChangeProducts | None = None
    projection: torch.Tensor | None = None
    # steps whose codes round with the dead band (`delta_int8.BAND`); None: all (the nudged phases); the free
    # phase's are set by `plan_free_phase`, and without a plan it rounds plainly
    band_steps: int | None = 0

    def repeat(self, times: int) -> LowPrecision:
        if self.base is not None:
            raise ValueError("repeat the inputs before EPNet.nudge_start, not after")
        keys = None if self.keys is None else self.keys.repeat(times)
        return LowPrecision(self.dtype, self.weights, keys, _copies(self.query_drive, times),
                            _copies(self.flat_x, times))


@dataclass
class PairedProducts:
    """One state's two products with the first synapse: `down` = h W over `row_scale` (None: already whole) into
    the projection layer, `up` = a Wᵀ into FC-1. The int8 kernels take both in one read of W (`drives`)."""

    down: torch.Tensor
    row_scale: torch.Tensor | None
    up: torch.Tensor
    changed: torch.Tensor | None = None  # (B,) bool: rows whose `down` changed since the last step (None: all)

    def scaled_down(self) -> torch.Tensor:
        return self.down if self.row_scale is None else self.down.mul_(self.row_scale.to(self.down.dtype))


@dataclass
class DeltaBase:
    """The free fixed point s* that the nudged phases are written relative to.

    `up[k]` = W_k a*_k and `down[k]` = W_kᵀ h*_{k+1} in the parameters' dtype, for the synapses whose
    products the nudged steps take on differences; `retrieval` is softmax(γ Q* Kᵀ) (bf16, one tensor
    per group of `DistinctKeys`) with attention, Q* without. The EP signal lives in s − s*: everything
    differenced stays out of bf16 rounding.
    """

    states: State  # s*: FC layers one row per nudged row (params' dtype), projection once per sample (bf16)
    up: list[torch.Tensor | None]
    down: list[torch.Tensor | None]
    retrieval: list[torch.Tensor] | torch.Tensor | None
    paired: bool = False  # the ±β phases of symmetric EP, stacked (`nudge_start(…, times=2)`)


def _num_projection_layers(net: EPNet) -> int:
    """1 if the state starts with the projection layer, else 0 (the state index of FC-1)."""
    return 1 if net.spec.num_projections else 0


# ------------------------------------------------------------------ inputs and weights
def prepare(net: EPNet, inputs: Inputs, kind: str, weights: list[LowPrecisionWeight | None] | None = None
            ) -> Inputs:
    """`EPNet.prepare` for precision "bf16" / "int8": the exact path's inputs with their large operands moved
    into `inputs.lowp` (the fp32 keys and query drive are dropped: the steps read `lowp`'s)."""
    weights = weights if weights is not None else low_precision_weights(net, kind)
    keys = query_drive = flat_x = None
    dtype = _companion_dtype(kind, net)
    if inputs.keys is not None:
        if net.spec.attention:
            keys = DistinctKeys.build(inputs.keys, inputs.key_mask, inputs.query_drive, net.spec.hopfield_gamma,
                                      dtype)
        else:
            query_drive = inputs.query_drive.to(dtype)
    if inputs.flat_x is not None and weights[0] is not None:
        flat_x = inputs.flat_x.to(dtype)
    rows = inputs.batch_size
    inputs.lowp = LowPrecision(dtype, weights, keys, query_drive, flat_x)
    inputs.keys = inputs.query_drive = None
    inputs.rows = rows
    return inputs


def _companion_dtype(kind: str, net: EPNet) -> torch.dtype:
    """The dtype of the products that are not int8: bf16, or for int8 on a CPU without bf16 instructions fp32
    (`lowp_weights.lowp_dtype`: torch would emulate the bf16 products there)."""
    if kind != "int8":
        return torch.bfloat16
    return lowp_weights.lowp_dtype(net.weights[0].device)


def low_precision_weights(net: EPNet, kind: str = "bf16") -> list[LowPrecisionWeight | None]:
    """`EPNet.low_precision_weights`: low-precision copies of the large FC weights (None for small synapses),
    rebuilt on every call.

    kind "bf16": refreshed in place in buffers kept on the net (a fresh 360 MB buffer costs more than the
    conversion itself: its pages are faulted in, docs/history.md); "int8": quantised and pre-packed anew
    (`lowp_weights.Int8Weight`). Not cached across calls: optimizers update parameters in place without
    always bumping their version counters (fused Adam does not), so a cache could silently serve stale
    weights. `release_low_precision` frees them.
    """
    big = [w.numel() >= LOWP_MIN_WEIGHTS for w in net.weights]
    old = getattr(net, "_lowp_cache", None) or [None] * len(net.weights)
    if kind == "int8":
        net._lowp_cache = None
        # our kernels' buffers are refilled in place; anything else (oneDNN's packed copies) is freed before building
        old = [p if isinstance(p, Int8Weight) and p.kernel in ("amx", "avx2") else None for p in old]
        down_dtype = _companion_dtype(kind, net)
        lows: list[LowPrecisionWeight | None] = [Int8Weight(w, previous=prev, down_dtype=down_dtype) if b else None
                                                 for w, prev, b in zip(net.weights, old, big)]
    elif kind == "bf16":
        lows = [Bf16Weight(w, prev) if b else None for w, prev, b in zip(net.weights, old, big)]
    else:
        raise ValueError(f"low-precision kind must be 'bf16' or 'int8', got {kind!r}")
    net._lowp_cache = lows
    return lows


def release_low_precision(net: EPNet) -> None:
    """`EPNet.release_low_precision`: drop the cached low-precision weights (rebuilt on demand)."""
    net._lowp_cache = None


# ------------------------------------------------------------------ ∂Φ/∂s
def layer_drive(net: EPNet, inputs: Inputs, state: State, n: int, paired: PairedProducts | None = None
                ) -> torch.Tensor | Query:
    """`EPNet.layer_drive` on the fast path: large products on low-precision operands, the rest in the params'
    dtype. `paired`: the first synapse's two products from this state, if already taken (`drives`).

    With attention the projection "drive" is only the top-down half of the query, W₁ᵀh¹, as a `Query` (X W₀ᵀ
    enters through the constant scores of `LowPrecision.keys`). In the nudged phases (`lowp.base` set) the
    projection state is stored as its difference δ from s*, and its drive is δQ = W₁ᵀ(h¹ − h¹*) (the rest of
    Q is folded into s*'s attention, `DeltaBase.retrieval`).
    """
    if net.spec.num_projections and n == 0:
        return _projection_drive(net, inputs.lowp, state, paired)
    drive = _bottom_up(net, inputs, state, n, paired)
    if n + 1 < len(state):
        drive = _add_top_down(net, inputs.lowp, state, n, drive)
    return drive


def drives(net: EPNet, inputs: Inputs, state: State) -> State:
    """`EPNet.drives` on the fast path: every layer's drive from one state, the first synapse's two products
    taken together (`_paired_products`)."""
    paired = _paired_products(net, inputs, state)
    return [layer_drive(net, inputs, state, n, paired) for n in range(len(state))]


def _paired_products(net: EPNet, inputs: Inputs, state: State) -> PairedProducts | None:
    """Both products of the projection → FC-1 synapse from one state, which the int8 kernels take in one read
    of the large matrix; None where there is no such low-precision synapse."""
    lp = inputs.lowp
    if not net.spec.num_projections or lp.weights[0] is None:
        return None
    h = state[1] if lp.base is None else state[1] - lp.base.states[1]
    x = state[0].reshape(state[0].shape[0], -1)
    changes = _change_products(net, lp)
    if changes is not None:
        return PairedProducts(*changes.down_up(h, x))
    absmax = None if lp.keys is None else lp.keys.row_absmax(state[0])  # known if the retrieval made state[0]
    return PairedProducts(*lp.weights[0].down_up(h, x, absmax))


def _change_products(net: EPNet, lp: LowPrecision) -> ChangeProducts | None:
    """This relaxation's first-synapse products from the codes that changed (`delta_int8`), made on its first
    step, where they run: int8 on our AVX2 kernels, with attention (whose retrieval of a sample with an unchanged
    query is skipped too); else None."""
    w = lp.weights[0]
    if not (FOLLOW_CHANGES and net.spec.attention and isinstance(w, Int8Weight) and w.kernel == "avx2"
            and lp.keys is not None):
        return None
    if lp.changes is None:
        band = delta_int8.PAIRED_BAND if lp.base is not None and lp.base.paired else delta_int8.BAND
        lp.changes = ChangeProducts(w.packed, lp.dtype, band, band_steps=lp.band_steps)
    return lp.changes


def _projection_drive(net: EPNet, lp: LowPrecision, state: State, paired: PairedProducts | None
                      ) -> torch.Tensor | Query:
    """The projection layer's drive: W₁ᵀh¹ (h¹ − h¹* in the nudged phases), plus X W₀ᵀ without attention."""
    base, w_low, shape = lp.base, lp.weights[0], state[0].shape
    h = None if paired is not None else (state[1] if base is None else state[1] - base.states[1])
    if net.spec.attention:  # a `Query`: the int8 product's row factors go into the scores
        if w_low is not None:
            if paired is not None:
                return Query(paired.down.view(shape), paired.row_scale, paired.changed)
            changes = _change_products(net, lp)
            if changes is not None:
                top_down, row_scale, changed = changes.down(h)
                return Query(top_down.view(shape), row_scale, changed)
            top_down, row_scale = w_low.down_row_scaled(h)
            return Query(top_down.view(shape), row_scale)
        return Query(torch.mm(h, net.weights[0]).view(shape).to(lp.dtype))
    if w_low is not None:
        top_down = (paired.scaled_down() if paired is not None else w_low.down(h)).view(shape)
    else:
        top_down = torch.mm(h, net.weights[0]).view(shape).to(lp.dtype)
    if base is None:  # no attention: σ needs the whole query
        return top_down.add_(lp.query_drive)
    return top_down


def _bottom_up(net: EPNet, inputs: Inputs, state: State, n: int, paired: PairedProducts | None) -> torch.Tensor:
    """FC layer n's bottom-up drive a W_kᵀ + b (k = the synapse that feeds it); in the nudged phases, where the
    product is low-precision or reads the projection layer, (a − a*) W_kᵀ + W_k a* + b."""
    lp, base = inputs.lowp, inputs.lowp.base
    k = n - _num_projection_layers(net)
    bias, w_low = net.biases[k], lp.weights[k]
    if n == 0:  # the flattened input (no projection layer): constant, no difference needed
        if w_low is not None:
            return w_low.up(lp.flat_x).to(bias.dtype).add_(bias)
        return torch.addmm(bias, inputs.flat_x, net.weights[k].t())
    below = state[n - 1].reshape(state[n - 1].shape[0], -1)
    from_proj = bool(net.spec.num_projections) and n == 1
    differenced = base is not None and (w_low is not None or from_proj)
    if differenced and not from_proj:  # FC state: full values, take the difference; projection: already δ
        below = below - base.states[n - 1].reshape(below.shape)
    if w_low is not None:
        changes = _change_products(net, lp) if from_proj and paired is None else None
        product = (paired.up if paired is not None and from_proj else
                   changes.up(below) if changes is not None else w_low.up(below))
    elif differenced:
        product = torch.mm(below.to(bias.dtype), net.weights[k].t())
    else:
        return torch.addmm(bias, below.to(bias.dtype), net.weights[k].t())
    product = product.to(bias.dtype)
    return product.add_(base.up[k]).add_(bias) if differenced else product.add_(bias)


def _add_top_down(net: EPNet, lp: LowPrecision, state: State, n: int, drive: torch.Tensor) -> torch.Tensor:
    """drive + h^{n+1} W_{k+1}; in the nudged phases, where that product is low-precision,
    + (h^{n+1} − h*) W_{k+1} + W_{k+1}ᵀ h*."""
    k = n + 1 - _num_projection_layers(net)
    above, w_low, base = state[n + 1], lp.weights[k], lp.base
    if w_low is None:
        return torch.addmm(drive, above, net.weights[k])
    if base is not None:
        return drive.add_(w_low.down(above - base.states[n + 1]).to(drive.dtype)).add_(base.down[k])
    return drive.add_(w_low.down(above).to(drive.dtype))


def update_projection(net: EPNet, inputs: Inputs, drive: torch.Tensor | Query) -> torch.Tensor:
    """`EPNet.update_layer` for the projection layer: the retrieval over distinct keys, or σ without attention;
    in the nudged phases the difference δs¹ from s*."""
    lp = inputs.lowp
    if lp.base is not None:
        return _delta_projection(net, lp, drive)
    if net.spec.attention:
        return _remember(lp, drive, lp.keys.retrieve(drive, lp.projection))
    return net.activation(drive)


def _remember(lp: LowPrecision, query: Query, retrieved: torch.Tensor) -> torch.Tensor:
    """Keep the retrieval for the next step where the query came from the change products (its unchanged samples
    retrieve this again); any other query leaves nothing to reuse."""
    lp.projection = retrieved if query.changed is not None else None
    if query.changed is not None:
        delta_int8.record_work("retrievals", int(query.changed.sum()), query.changed.numel())
    return retrieved


def _delta_projection(net: EPNet, lp: LowPrecision, delta_q: torch.Tensor | Query) -> torch.Tensor:
    """δs¹ = s¹(Q* + δQ) − s¹(Q*) without forming either term in bf16."""
    if net.spec.attention:
        return _remember(lp, delta_q, lp.keys.delta_retrieve(lp.base.retrieval, delta_q, lp.projection))
    q = lp.base.retrieval.to(torch.float32)
    return (net.activation(q + delta_q.to(torch.float32)) - net.activation(q)).to(lp.dtype)


def plan_free_phase(net: EPNet, inputs: Inputs, steps: int, tol: float | None) -> None:
    """`EPNet.plan_free_phase`: a free phase of `steps` steps rounds its codes with the dead band up to its last
    PLAIN_LAST steps; one that may stop early (`tol`) rounds plainly throughout. Planned again for what is left when
    the free phase continues in the difference form (`dynamics.relax`'s refinement)."""
    inputs.lowp.band_steps = max(0, steps - PLAIN_LAST) if tol is None else 0


# ------------------------------------------------------------------ nudged phases in difference form
def nudge_start(net: EPNet, inputs: Inputs, free: State, times: int = 1) -> tuple[Inputs, State]:
    """`EPNet.nudge_start` on the fast path: the nudged states written relative to the free fixed point s*
    (`DeltaBase`; the projection state starts at δ = 0), with the s*-terms of the large products computed
    here, once, in the params' dtype. `full_state` turns the final nudged state back into full values."""
    lp = inputs.lowp
    P = _num_projection_layers(net)
    stacked = [_copies(s, times) for s in free[P:]]  # the projection layer starts at δ = 0 (below)
    if P:
        delta_shape = (free[0].shape[0] * times, *free[0].shape[1:])
        stacked.insert(0, torch.zeros(delta_shape, dtype=lp.dtype, device=free[0].device))
    base = _delta_base(net, inputs, free, times)
    if times == 1:
        return replace(inputs, lowp=replace(lp, base=base, changes=None, projection=None, band_steps=None)), stacked
    keys = None if lp.keys is None else lp.keys.repeat(times, constants=False)
    lowp = LowPrecision(lp.dtype, lp.weights, keys, None, _copies(lp.flat_x, times), base, band_steps=None)
    # only what the nudged steps and the ∂Φ/∂θ contrast read: no copies of the fp32 keys and query drive, and
    # x_query once (B rows: the contrast needs the free batch's); masks live in `lowp.keys` (its counts)
    rows = free[-1].shape[0] * times
    return Inputs(inputs.x_query, None, None, None, _copies(inputs.flat_x, times), lowp, rows=rows,
                  query_streams=inputs.query_streams), stacked


def _delta_base(net: EPNet, inputs: Inputs, free: State, times: int) -> DeltaBase:
    """The s*-terms of the nudged steps' products, for `times` stacked copies of the batch."""
    lp = inputs.lowp
    P = _num_projection_layers(net)
    dtype = net.biases[0].dtype
    up: list[torch.Tensor | None] = [None] * len(net.weights)
    down: list[torch.Tensor | None] = [None] * len(net.weights)
    for k, w in enumerate(net.weights):
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
        q = layer_drive(net, inputs, free, 0)  # the query at s*, as the free phase computes it
        if net.spec.attention:
            retrieval = DistinctKeys.repeat_weights(lp.keys.attention(q), times)
        else:
            retrieval = _copies(q, times)
    # the projection's s* once per sample (the contrast and `full_state` read it), the FC layers' per row
    return DeltaBase(free[:P] + [_copies(s, times) for s in free[P:]], up, down, retrieval, paired=times == 2)


def _copies(t: torch.Tensor | None, times: int) -> torch.Tensor | None:
    """`times` copies of t stacked along the batch (t itself for one)."""
    return t if t is None or times == 1 else torch.cat([t] * times)


def full_state(net: EPNet, inputs: Inputs, state: State) -> State:
    """`EPNet.full_state`: undo `nudge_start`'s difference form, s* + δ for the projection layer, in the params'
    dtype (the FC layers are stored as full values)."""
    lp = inputs.lowp
    if lp.base is None or not net.spec.num_projections:
        return state
    dtype = net.biases[0].dtype
    s_star = lp.base.states[0]
    if s_star.shape[0] != state[0].shape[0]:  # ±β copies of the batch: s* is stored once per sample
        s_star = s_star.repeat(state[0].shape[0] // s_star.shape[0], *([1] * (s_star.dim() - 1)))
    return [s_star.to(dtype) + state[0].to(dtype), *state[1:]]


# ------------------------------------------------------------------ ∂Φ/∂θ
def symmetric_contrast(net: EPNet, inputs: Inputs, nudged: State, scale: float) -> dict[str, torch.Tensor]:
    """`EPNet.symmetric_contrast` read from the difference form directly (`inputs` from `nudge_start(…,
    times=2)`).

    With a± = a* + δ± the projection synapse's contrast is (h⁺ − h⁻) a*ᵀ + h⁺ δ⁺ᵀ − h⁻ δ⁻ᵀ, one bf16 product
    over the 3B rows [h⁺ − h⁻; h⁺; −h⁻] × [a*; δ⁺; δ⁻] in which every operand is rounded relative to its own
    size (and δ⁺ ≈ −δ⁻: nothing cancels); W₀'s contrast Σ_t (δ⁺ − δ⁻)_t x_tᵀ needs B rows, not 2B, and s*
    drops out exactly.
    """
    half = nudged[-1].shape[0] // 2
    P = _num_projection_layers(net)
    grads: dict[str, torch.Tensor] = _projection_contrast(net, inputs, nudged, scale) if P else {}
    fc = nudged[P:]
    for k, h in enumerate(fc):
        hp, hm = h[:half], h[half:]
        grads[f"biases.{k}"] = (hp - hm).sum(0).mul_(scale)
        n = k + P
        if n == 0:  # the constant flattened input
            x = inputs.flat_x[:half]
            grads[f"weights.{k}"] = torch.mm((hp - hm).t(), x).mul_(scale)
        elif P and n == 1:  # from the projection layer, stored as δ from s*
            grads[f"weights.{k}"] = _first_synapse_contrast(net, inputs.lowp, nudged, hp, hm, k, scale)
        else:
            signed = torch.cat([hp, -hm]).mul_(scale)
            grads[f"weights.{k}"] = torch.mm(signed.t(), fc[k - 1])
    return {name: grads[name] for name, _ in net.named_parameters()}


def _projection_contrast(net: EPNet, inputs: Inputs, nudged: State, scale: float) -> dict[str, torch.Tensor]:
    """scale · Σ (s⁺ − s⁻) x_tᵀ for W₀ (or Σ (s⁺ − s⁻) for learned queries), from the projection's δ±."""
    half = nudged[-1].shape[0] // 2
    # s⁺ − s⁻ of the projection layer, in a new tensor: where the projection states already have the params' dtype
    # (int8 on a CPU without bf16 instructions) `.to` returns δ⁺ itself, which the first synapse's contrast reads next
    diff = nudged[0][:half].to(net.biases[0].dtype, copy=True).sub_(nudged[0][half:])
    if net.proj_query is not None:
        return {"proj_query": diff.sum(0).mul_(scale)}
    # x_query: the free batch's B rows (`nudge_start`); per projection where streams repeat, so that no
    # gathered copy of the tokens is made
    x = inputs.x_query
    if inputs.streams_in_order:
        return {"proj_weight": torch.einsum("bple,bpld->ped", diff, x).mul_(scale)}
    return {"proj_weight": torch.stack([torch.einsum("ble,bld->ed", diff[:, p], x[:, s])
                                        for p, s in enumerate(inputs.query_streams)]).mul_(scale)}


def _first_synapse_contrast(net: EPNet, lp: LowPrecision, nudged: State, hp: torch.Tensor, hm: torch.Tensor,
                            k: int, scale: float) -> torch.Tensor:
    """The projection → FC-1 synapse's contrast from a* (once per sample) and the projection's δ±."""
    dtype = net.biases[0].dtype
    rows = nudged[-1].shape[0]
    half = rows // 2
    a_star = lp.base.states[0].reshape(half, -1)  # s* of the projection: once per sample
    deltas = nudged[0].reshape(rows, -1)
    if lp.weights[k] is None:
        a_full = torch.cat([a_star, a_star]).to(dtype) + deltas.to(dtype)
        signed = torch.cat([hp, -hm]).mul_(scale)
        return torch.mm(signed.t(), a_full)
    left_t = torch.cat([hp - hm, hp, -hm]).mul_(scale).to(lp.dtype).t().contiguous()
    out = _scratch(net, f"weights.{k}", (left_t.shape[0], a_star.shape[1]), dtype)
    # [a*; δ⁺; δ⁻] in bf16 one block of columns at a time: the whole (3B, a) operand (46 MB at SNLI) would be
    # the batch's largest temporary, allocated late in the heap the process keeps
    right = torch.empty(half + rows, CONTRAST_BLOCK, dtype=lp.dtype, device=a_star.device)
    for lo in range(0, out.shape[1], CONTRAST_BLOCK):  # bf16 product, fp32 result in place
        hi = min(lo + CONTRAST_BLOCK, out.shape[1])
        block = right[:, :hi - lo]
        block[:half].copy_(a_star[:, lo:hi])
        block[half:].copy_(deltas[:, lo:hi])
        out[:, lo:hi].copy_(torch.mm(left_t, block))
    return out


def _scratch(net: EPNet, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer kept on the net that nobody else references (checked), else a new one kept for next time.

    For the largest per-batch outputs (the FC-1 gradient): reusing memory the process already owns avoids
    first-touch page faults, which can cost as much as the product itself (docs/history.md). Up to two
    buffers per name (the caller may still hold the previous batch's result).
    """
    pool = net.__dict__.setdefault("_scratch_pool", {}).setdefault(name, [])
    for buf in pool:
        # free iff no C++ holder (e.g. as a .grad) and no Python holder besides the pool, `buf`, the call
        if buf.shape == shape and buf.dtype == dtype and buf._use_count() == 1 and sys.getrefcount(buf) <= 3:
            return buf
    buf = torch.empty(shape, dtype=dtype, device=net.weights[0].device)
    if len(pool) < 2:
        pool.append(buf)
    return buf


def enable_compiled_kernels(enabled: bool = True) -> None:
    """Use fused, one-pass versions of the fast path's softmax kernels.

    The free phase's scores-plus-softmax and the nudged phases' softmax difference
    (`retrieval.delta_attention`) each become one pass over the scores. Where our C kernels load
    (`native_kernels`: AVX-512 with AMX, a C compiler) they are those, else `torch.compile`d ones (about 2×
    to 4× faster than torch's bf16 softmax; the first call compiles, ~10-40 s, then cached on disk by
    inductor). Off by default; `seqep bench` and `seqep train` turn it on. Results equal the eager kernels'
    up to fp32 rounding. Without our int8 kernels it also compiles the oneDNN int8 path's quantisers
    (`lowp_weights.enable_compiled_quantizers`).
    """
    enable_compiled(enabled)
    enable_compiled_quantizers(enabled)
