"""The network *is* its scalar primitive Φ: parameters, Φ, and Φ's analytic gradients.

    Φ(X, s; θ) = Σ_p Σ_t ⟨W₀ᵖ x^{q(p)}_t, sᵖ_t⟩  +  Σ_n ⟨h^{n+1}, W_n a^n + b_n⟩

`sᵖ` are the projection layers (one d-vector per token, updated by a Hopfield retrieval whose query is
∂Φ/∂sᵖ), `h¹..h^N` the fully connected layers (h^N = output), `a⁰ = flat(s¹..s^P)` (or the flattened
input when there is no projection layer: a plain MLP) and `a^n = h^n` after that. Φ is bilinear in
states and weights, so ∂Φ/∂s and ∂Φ/∂θ are plain matrix products: no autograd graph is needed in the
relaxation loop. `analog_ep.reference` keeps an autograd path on Φ as the test oracle.

The graph's shapes are a `GraphSpec` (`analog_ep.spec`); the per-batch constants and the layer states are
`Inputs` and `State` (`analog_ep.state`, layout `[proj (B,P,L,d)]` if P > 0, then the FC layers `(B, n_k)`).
This module computes Φ exactly. The CPU fast path (`prepare(x, precision="bf16" | "int8")`) computes the same
Φ on low-precision operands; each operation that has such a form hands it to `analog_ep.fast.lowp_phi` in one
place, where `Inputs.lowp` is set, and that module (with its native kernels) is loaded only then.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

from analog_ep.activations import get_activation
from analog_ep.embedding import PairFeatures, embed_batch, embedding_grad
from analog_ep.hopfield import hopfield_retrieve, hopfield_weights
from analog_ep.schedule import run_schedule
from analog_ep.spec import GraphSpec, Projection
from analog_ep.state import Inputs, State

if TYPE_CHECKING:
    from analog_ep.fast.lowp_weights import LowPrecisionWeight
    from analog_ep.fast.retrieval import Query

__all__ = ["PRECISIONS", "EPNet", "GraphSpec", "Inputs", "Projection", "State", "enable_compiled_kernels",
           "mse_loss", "one_hot_target", "signed_coef"]

PRECISIONS = ("fp32", "bf16", "int8")  # bf16: the fast path's large products on bf16 operands; int8: FC ones in int8
FAST_PATH_CACHES = ("_lowp_cache", "_scratch_pool")  # what the fast path keeps on the net between batches


def _fast() -> ModuleType:
    """The fast path's operations, imported on first use: the exact path never loads them or their kernels."""
    from analog_ep.fast import lowp_phi

    return lowp_phi


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
        self.embedding = nn.Parameter(torch.empty(spec.vocab_size, spec.embed_dim)) if spec.vocab_size else None
        self.activation = get_activation(spec.activation)
        self.reset_parameters(seed)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the fast path's per-batch caches behind: low-precision weights are rebuilt on
        demand, and int8 ones hold oneDNN's opaque packed tensors, which can be neither deep-copied nor pickled."""
        state = dict(super().__getstate__())
        for name in FAST_PATH_CACHES:
            state.pop(name, None)
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
            if self.embedding is not None:  # drawn last: a net without a table draws exactly what it always did
                self.embedding.copy_(torch.randn(self.embedding.shape, generator=gen))
                self.embedding[0] = 0  # PAD

    @property
    def param_layer(self) -> dict[str, str]:
        """Which layer each parameter feeds (for per-layer gradient reports)."""
        names = self.spec.layer_names
        out = {n: "proj" for n in ("proj_weight", "proj_query") if getattr(self, n) is not None}
        if self.embedding is not None:
            out["embedding"] = "embedding"
        offset = 1 if self.spec.num_projections else 0
        for n in range(len(self.weights)):
            out[f"weights.{n}"] = names[offset + n]
            out[f"biases.{n}"] = names[offset + n]
        return out

    # ------------------------------------------------------------------ inputs and states
    def prepare(self, x: torch.Tensor, precision: str = "fp32",
                weights: list[LowPrecisionWeight | None] | None = None, fold: bool = False) -> Inputs:
        """Per-batch constants from embedded tokens x: (B, S, L, d), or from token ids (B, S, L) when the net
        learns its word vectors (`embedding`): they are looked up here, and the ids kept for Φ's ∂/∂table.

        precision "fp32" (default): every product in the parameters' dtype (the exact path). "bf16": the
        large products run on bf16 operands (`Inputs.lowp`, `analog_ep.fast.lowp_phi`). "int8": the same,
        with the large FC products in int8 (`lowp_weights.Int8Weight`; CPU builds with oneDNN only).
        `weights`: low-precision weights built once by `low_precision_weights` for batches that share
        the same parameters (inference); by default they are rebuilt here, as training needs.
        `fold` (fp32 only): relaxations run with the first synapse folded onto each sequence's distinct keys
        (`analog_ep.fast.folded`): the same fixed points with fewer multiply-adds where sequences are short.
        Without fold and outside autograd, the exact path's retrievals run over each sequence's distinct keys
        where that saves enough (`DistinctKeys.for_exact_path`: long reviews with repeated words).
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        ids = None
        if not x.dtype.is_floating_point:
            ids, x = x, self.embed(x)
            if precision != "fp32":
                raise ValueError("learned word vectors train on the exact path: use precision fp32 (the fast path "
                                 "has no contrast for the embedding table)")
        inputs = self._exact_inputs(x, ids)
        if precision != "fp32":
            if fold:
                raise ValueError("fold runs the fp32 products; the bf16 and int8 paths have their own retrieval")
            return _fast().prepare(self, inputs, precision, weights)
        if fold:
            from analog_ep.fast import folded

            return folded.prepare(self, inputs)
        if self.spec.attention and inputs.keys is not None and not torch.is_grad_enabled():
            from analog_ep.fast.retrieval import DistinctKeys

            inputs.distinct = DistinctKeys.for_exact_path(inputs.keys, inputs.key_mask, self.spec.hopfield_gamma,
                                                          self.spec.proj_len)
        return inputs

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, S, L) token ids -> (B, S, L, d) through the learned table (PAD exactly zero; with
        `spec.exact_match` the pair-overlap channel appended). Differentiable: BPTT reaches the table through it."""
        if self.embedding is None:
            raise ValueError("this net reads word vectors, not token ids: give prepare() embedded tokens (B, S, L, d), "
                             "or build it with GraphSpec(vocab_size=...) to learn the vectors")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.spec.vocab_size):
            raise ValueError(f"token ids must lie in 0..{self.spec.vocab_size - 1} (the table's rows), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        return embed_batch(ids, self.embedding, PairFeatures(exact_match=self.spec.exact_match))

    def _exact_inputs(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> Inputs:
        """`ids` (token ids, when the net looked x up itself): padding is masked by id, so that a learned row
        that happens to be zero (UNK at the start) still counts as a token."""
        spec = self.spec
        expected = (spec.num_streams, spec.seq_len, spec.dim)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input must have shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = x.to(self.weights[0].dtype)
        if spec.input_scale != 1.0:
            x = x * spec.input_scale
        if not spec.num_projections:
            return Inputs(None, None, None, None, x.reshape(x.shape[0], -1), ids=ids)
        key_streams = [p.key_stream for p in spec.projections]
        keys = x[:, key_streams]
        key_mask = None
        if spec.mask_padding:
            key_mask = (keys != 0).any(-1) if ids is None else ids[:, key_streams] != 0
        if self.proj_query is not None:  # Hopfield pooling: the query drive is the learned patterns
            return Inputs(None, keys, key_mask, self.proj_query.expand(x.shape[0], -1, -1, -1), None, ids=ids)
        streams = tuple(p.query_stream for p in spec.projections)
        query_drive = torch.einsum("bpld,ped->bple", x[:, list(streams)], self.proj_weight)
        return Inputs(x, keys, key_mask, query_drive, None, query_streams=streams, ids=ids)

    def low_precision_weights(self, kind: str = "bf16") -> list[LowPrecisionWeight | None]:
        """Low-precision copies of the large FC weights, rebuilt on every call (`lowp_phi.low_precision_weights`).
        Pass them to `prepare` to reuse them across batches while the parameters do not change."""
        return _fast().low_precision_weights(self, kind)

    def release_low_precision(self) -> None:
        """Drop the cached low-precision weight copies (memory; they are rebuilt on demand)."""
        _fast().release_low_precision(self)

    def plan_free_phase(self, inputs: Inputs, steps: int, tol: float | None) -> None:
        """Tell the fast path how a free phase will run (`lowp_phi.plan_free_phase`); the exact path needs nothing."""
        if inputs.lowp is not None:
            _fast().plan_free_phase(self, inputs, steps, tol)

    def nudge_start(self, inputs: Inputs, free: State, times: int = 1) -> tuple[Inputs, State]:
        """Inputs and starting state of the nudged phase(s), `times` copies of the batch (2 for ±β).

        Exact path: `inputs.repeat(times)` and the free state stacked. The fast path writes the nudged states
        relative to the free fixed point (`lowp_phi.nudge_start`): hand the final nudged state to `full_state`
        before taking ∂Φ/∂θ.
        """
        if inputs.lowp is not None:
            return _fast().nudge_start(self, inputs, free, times)
        rep = inputs.repeat(times) if times > 1 else inputs
        return rep, [s.repeat(times, *([1] * (s.dim() - 1))) if times > 1 else s for s in free]

    def full_state(self, inputs: Inputs, state: State) -> State:
        """The nudged state as full values: the exact path stores them so already; the fast path's difference
        form is undone (`lowp_phi.full_state`)."""
        if inputs.lowp is not None:
            return _fast().full_state(self, inputs, state)
        return state

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
    def layer_drive(self, inputs: Inputs, state: State, n: int) -> torch.Tensor | Query:
        """∂Φ/∂s for layer n (state index): bottom-up `a W_nᵀ + b` plus top-down `h^{n+1} W_{n+1}`.

        Two matrix products per synapse per full step: one into each of the two layers it joins.
        With `inputs.lowp` the large products run on low-precision operands (`lowp_phi.layer_drive`).
        """
        if inputs.lowp is not None:
            return _fast().layer_drive(self, inputs, state, n)
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

    def drives(self, inputs: Inputs, state: State) -> State:
        """∂Φ/∂s for every layer (no nudging), all from the same state."""
        if inputs.lowp is not None:
            return _fast().drives(self, inputs, state)
        return [self.layer_drive(inputs, state, n) for n in range(len(state))]

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
            if inputs.lowp is not None:
                return _fast().update_projection(self, inputs, drive)
            if self.spec.attention:
                if inputs.distinct is not None and not torch.is_grad_enabled():  # the same softmax over U ≤ L keys
                    return inputs.distinct.retrieve_drive(drive)
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
        return run_schedule(self.spec.schedule, state, lambda s, n: self.layer_drive(inputs, s, n),
                            lambda s, n, u: self.update_layer(inputs, s, n, u, beta, target),
                            all_drives=lambda s: self.drives(inputs, s))

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
        if self.embedding is not None and inputs.ids is not None:
            tokens = self._token_grads(inputs, state, c)[..., :self.spec.embed_dim]  # the overlap flag is no parameter
            grads["embedding"] = embedding_grad(inputs.ids, tokens, self.spec.vocab_size)
        return grads

    def _token_grads(self, inputs: Inputs, state: State, c: torch.Tensor) -> torch.Tensor:
        """Σ_b c_b ∂(Φ − Σ_p Lᵖ)/∂x_b per token, (B, S, L, d): what the learned word vectors' contrast is made of.

        A token enters Φ as a key of each projection that reads its stream (and, without pooling, as a query
        through ⟨W₀ x_t, s_t⟩). The retrieval sᵖ = softmax(γ u Kᵀ) K maximises ⟨s, u⟩ − Lᵖ(s; K), where Lᵖ is the
        convex conjugate of lse_γ(K u) = γ⁻¹ log Σ_t exp(γ k_t·u); by the envelope theorem
        −∂Lᵖ/∂k_t = Σ_q α_qt u_q at the fixed point (u = ∂Φ/∂sᵖ, α = softmax(γ u Kᵀ)): the attention-weighted
        drive, local to the projection layer. docs/theory.md has the derivation.
        """
        spec = self.spec
        scale = c.view(-1, 1, 1, 1)
        if not spec.num_projections:  # ⟨h¹, W₀ x⟩: ∂/∂x = W₀ᵀ h¹
            B = state[0].shape[0]
            return torch.mm(state[0] * c, self.weights[0]).view(B, spec.num_streams, spec.seq_len, spec.dim) \
                * spec.input_scale
        proj = state[0].to(c.dtype)
        grads = torch.zeros(proj.shape[0], spec.num_streams, spec.seq_len, spec.dim, dtype=c.dtype, device=c.device)
        if spec.attention:
            u = self.layer_drive(inputs, state, 0)
            alpha = hopfield_weights(u, inputs.keys, spec.hopfield_gamma, inputs.key_mask)
            keys = torch.einsum("bpqk,bpqd->bpkd", alpha * scale, u)
            for p, pr in enumerate(spec.projections):
                grads[:, pr.key_stream] += keys[:, p]
        if self.proj_weight is not None:
            queries = torch.einsum("bple,ped->bpld", proj * scale, self.proj_weight)
            for p, pr in enumerate(spec.projections):
                grads[:, pr.query_stream] += queries[:, p]
        return grads * spec.input_scale

    def symmetric_contrast(self, inputs: Inputs, nudged: State, scale: float) -> dict[str, torch.Tensor]:
        """scale · Σ_b [∂Φ/∂θ(s⁺_b) − ∂Φ/∂θ(s⁻_b)] for the ±β nudged states stacked as [s⁺; s⁻].

        `inputs`, `nudged` as `nudge_start(…, times=2)` and `relax` leave them: `phi_param_grads` with
        coef = (+scale…, −scale…), or, for the fast path's difference form, the same contrast read from the
        differences directly (`lowp_phi.symmetric_contrast`).
        """
        if inputs.lowp is not None and inputs.lowp.base is not None:
            return _fast().symmetric_contrast(self, inputs, nudged, scale)
        return self.phi_param_grads(inputs, nudged, signed_coef(nudged[-1].shape[0] // 2, scale, nudged[-1]))

    def named_param_dict(self) -> dict[str, nn.Parameter]:
        return dict(self.named_parameters())


def enable_compiled_kernels(enabled: bool = True) -> None:
    """Fused one-pass kernels for the fast path's retrieval and int8 quantisers; see
    `analog_ep.fast.lowp_phi.enable_compiled_kernels`."""
    _fast().enable_compiled_kernels(enabled)


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
