"""The first synapse folded onto each sequence's distinct keys: a relaxation with several times fewer multiply-adds
where sequences are short and word vectors wide (SNLI at the paper's shape), in fp32, equal to the exact path up
to the order of its sums.

The projection layer's state is a retrieval, sᵖ = α K with α = softmax(γ u Kᵀ + log count) over the U distinct
keys K of the sequence it reads, and it meets FC-1 only through the first synapse W₀:

- FC-1's bottom-up drive is W₀ s = Σ_{p,i,j} α_pij F_pij, with F_pij = W₀,pi k_pjᵀ (a column per query and key);
- the projection's drive u = q₀ + h W₀ enters only through the scores γ u Kᵀ = γ (q₀ Kᵀ + h F).

With F = W₀ Kᵀ (H × P·Lq·U) built once per sample (H·P·Lq·U·d multiply-adds), every step takes
2·H·P·Lq·U multiply-adds for the two products instead of 2·H·P·Lq·d, and the (P, Lq, d) state is formed only
when the relaxation ends (and for the residual, where one is asked for). At snli-paper (d = 300, L = 25,
U ≈ 13 distinct words) that is ~20 times fewer per step; at IMDB (U ≈ 137 of 600 tokens, d = 300) the fold
costs more than it saves, and `resolve_fold` says no.

The samples are relaxed one at a time, each through all its steps while its F is in cache (a step's products
are then matrix-vector products, bound by memory, not arithmetic); their rows do not interact, so this is the
same computation as the batched one. Early exit (`tol`) stops each sample on its own residual; the trace
reports per step the largest residual over the samples still running.

The exact path (`analog_ep.phi`, `hopfield`) is the oracle this module is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from analog_ep.fast.retrieval import distinct_keys
from analog_ep.phi import run_schedule
from analog_ep.state import Inputs, State

EPNet = Any  # `analog_ep.phi.EPNet` (annotations only)

REQUESTS = ("auto", "on", "off")  # `ep.fold_keys`
FOLDING_ESTIMATORS = ("ep_symmetric", "ep_two_phase")  # relax without autograd through the steps, on the exact path
MIN_WIDTH_RATIO = 8  # fold where d ≥ this × L: a folded step's products run at matrix-vector speed, several times
# below a batched matrix product's (docs/benchmarks.md), so it must save at least that many multiply-adds
BUILD_CHUNK = 16  # samples whose folds are built by one matrix product per projection
MAX_FOLD_BYTES = 2 << 30  # the folded synapses of a batch are kept for its nudged phases: at most this much memory


def _fold_pays(spec: Any, batch: int) -> tuple[bool, str]:
    """Whether folding the first synapse onto the keys pays for this graph (with attention projections) and batch
    size, and why (or why not)."""
    if spec.dim < MIN_WIDTH_RATIO * spec.seq_len:
        return False, (f"token width d = {spec.dim} is below {MIN_WIDTH_RATIO} × the {spec.seq_len} keys per "
                       "sequence: folding would not save enough")
    size = 4 * batch * spec.layers[0] * spec.num_projections * spec.proj_len * spec.seq_len
    if size > MAX_FOLD_BYTES:
        return False, f"the folded synapses would take {size / 2**30:.1f} GiB (limit {MAX_FOLD_BYTES / 2**30:.0f})"
    return True, (f"first synapse folded onto each sequence's distinct keys (d = {spec.dim} ≥ {MIN_WIDTH_RATIO} × "
                  f"L = {spec.seq_len})")


def resolve_fold(request: str, spec: Any, precision: str, estimator: str, batch: int, device: str = "cpu"
                 ) -> tuple[bool, str]:
    """(fold, reason) for `ep.fold_keys` = request; ConfigError where "on" cannot run."""
    from analog_ep.errors import ConfigError

    if request not in REQUESTS:
        raise ConfigError(f"ep.fold_keys = {request!r}; choose one of {', '.join(REQUESTS)}")
    if request == "off":
        return False, "off: requested"
    blockers = []
    if precision != "fp32":
        blockers.append(f"the run computes in {precision} (folding runs the fp32 products)")
    if estimator not in FOLDING_ESTIMATORS:
        blockers.append(f"estimator {estimator} (folding serves {', '.join(FOLDING_ESTIMATORS)})")
    if not spec.num_projections or not spec.attention:
        blockers.append("the graph has no attention projection")
    if blockers:
        if request == "on":
            raise ConfigError(f"ep.fold_keys = on cannot run here: {'; '.join(blockers)}. Use ep.fold_keys auto or off")
        return False, "off: " + "; ".join(blockers)
    if request == "on":
        return True, "on: requested"
    if torch.device(device).type != "cpu":
        return False, f"off: on {device} the sample-by-sample relaxation would be bound by kernel launches"
    pays, why = _fold_pays(spec, batch)
    return pays, ("on: " if pays else "off: ") + why


@dataclass
class SampleFold:
    """One sample's first synapse in key space."""

    folded: torch.Tensor  # (H, P·Lq·U): F = W₀ Kᵀ per projection, query and key
    const: torch.Tensor  # (P·Lq·U,) γ q₀ Kᵀ + log count; −inf where a slot holds no key
    keys: torch.Tensor  # (P, U, d) the distinct keys, zero past a projection's count
    empty: torch.Tensor  # (P,) bool: the projection has no key at all (its retrieval is zero)


@dataclass
class FoldedKeys:
    """The per-batch operand of the folded relaxation (`Inputs.folded`): one `SampleFold` per sample, built on
    first use and kept for the nudged phases, whose rows are copies of the batch (row r reads sample r mod B)."""

    batch: int
    weights: torch.Tensor  # (P, H·Lq, d): W₀ laid out per projection, copied once per batch
    samples: dict[int, SampleFold] = field(default_factory=dict)

    def sample(self, net: EPNet, inputs: Inputs, b: int) -> SampleFold:
        if b not in self.samples:
            first = b - b % BUILD_CHUNK
            self.samples.update(_fold_chunk(net, inputs, range(first, min(first + BUILD_CHUNK, self.batch)),
                                            self.weights))
        return self.samples[b]


def prepare(net: EPNet, inputs: Inputs) -> Inputs:
    """The exact path's inputs with the folded operand attached (`EPNet.prepare(x, fold=True)`)."""
    if not net.spec.attention or inputs.keys is None:
        raise ValueError("folding needs attention projections (the retrieval's keys)")
    spec = net.spec
    P, Lq, d = spec.num_projections, spec.proj_len, spec.dim
    weights = net.weights[0].detach().view(-1, P, Lq * d).transpose(0, 1).reshape(P, -1, d)
    inputs.folded = FoldedKeys(inputs.batch_size, weights)
    return inputs


def _fold_chunk(net: EPNet, inputs: Inputs, samples: range, weights: torch.Tensor) -> dict[int, SampleFold]:
    """The folds of consecutive samples: one matrix product per projection for all of them (each sample alone
    would be a product with as few columns as it has keys, far below the machine's matrix rate), then each
    sample's part cut to its own number of distinct keys."""
    P, Lq = net.spec.num_projections, net.spec.proj_len
    picked = slice(samples.start, samples.stop)
    keys = inputs.keys[picked]  # (c, P, L, d)
    c, _, length, d = keys.shape
    mask = None if inputs.key_mask is None else inputs.key_mask[picked].reshape(c * P, length)
    distinct, counts, sizes = distinct_keys(keys.reshape(c * P, length, d), mask)
    width = max(int(sizes.max()), 1)
    distinct = distinct[:, :width].view(c, P, width, d)
    counts, sizes = counts[:, :width].view(c, P, width), sizes.view(c, P)
    hidden = weights.shape[1] // Lq
    # (P, H·Lq, d) · (P, d, c·U) -> (P, H, Lq, c, U)
    folded = torch.bmm(weights, distinct.permute(1, 3, 0, 2).reshape(P, d, c * width)).view(P, hidden, Lq, c, width)
    const = torch.einsum("cpqd,cpud->cpqu", inputs.query_drive[picked], distinct).mul_(net.spec.hopfield_gamma)
    const = const.add_(counts.log().unsqueeze(2))  # log 0 = −inf: slots without a key take no weight
    out = {}
    for i, b in enumerate(samples):
        u = max(int(sizes[i].max()), 1)
        f = folded[:, :, :, i, :u].permute(1, 0, 2, 3).reshape(hidden, P * Lq * u)  # (H, P·Lq·U_b)
        out[b] = SampleFold(f, const[i, :, :, :u].reshape(-1), distinct[i, :, :u].contiguous(), sizes[i] == 0)
    return out


@dataclass
class _SampleTrace:
    residuals: list[float]
    steps: int


def relax(net: EPNet, inputs: Inputs, state: State, steps: int, beta: float | torch.Tensor = 0.0,
          target: torch.Tensor | None = None, tol: float | None = None, track: bool = True,
          residual: str = "all") -> tuple[State, list[float], int]:
    """`dynamics.relax` on the folded operand: the final state in full form, the per-step residuals (largest
    over the samples still running; empty when untracked) and the steps taken (the most any sample took)."""
    fold: FoldedKeys = inputs.folded
    spec = net.spec
    rows = state[1].shape[0]
    copies = rows // fold.batch
    start = state[0].reshape(rows, -1)
    # FC-1's first drive reads the starting projection state where the schedule updates both layers at once
    start_up = (torch.mm(start, net.weights[0].t()) if spec.schedule == "synchronous" and bool(start.any())
                else None)
    out = [torch.empty_like(s) for s in state]
    traces = []
    for b in range(fold.batch):
        idx = torch.arange(copies, device=start.device) * fold.batch + b
        sample = fold.sample(net, inputs, b)
        beta_b = beta[idx] if isinstance(beta, torch.Tensor) else beta
        target_b = None if target is None else target[idx]  # `dynamics.relax` passes a target only when nudging
        up_b = None if start_up is None else start_up[idx]
        proj = state[0][idx]
        attention, fc, trace = _relax_sample(net, inputs, sample, proj, [s[idx] for s in state[1:]], up_b,
                                             steps, beta_b, target_b, tol, track, residual)
        out[0][idx] = _retrieved(sample, attention, proj).to(out[0].dtype)
        for o, s in zip(out[1:], fc):
            o[idx] = s
        traces.append(trace)
    taken = max(t.steps for t in traces)
    residuals = [max(t.residuals[i] for t in traces if i < len(t.residuals)) for i in range(taken)] if (
        track or tol is not None) else []
    return out, residuals, taken


def _retrieved(sample: SampleFold, attention: torch.Tensor | None, start: torch.Tensor) -> torch.Tensor:
    """(copies, P, Lq, d) the projection state from attention weights (copies, P, Lq, U): α K; the starting state
    where no step has run."""
    if attention is None:
        return start
    return torch.matmul(attention, sample.keys)  # (copies, P, Lq, U) · (P, U, d), broadcast over the copies


def _relax_sample(net: EPNet, inputs: Inputs, sample: SampleFold, proj: torch.Tensor, fc: State,
                  start_up: torch.Tensor | None, steps: int, beta: float | torch.Tensor, target: torch.Tensor | None,
                  tol: float | None, track: bool, residual: str) -> tuple[torch.Tensor | None, State, _SampleTrace]:
    spec = net.spec
    copies = fc[0].shape[0]
    P, Lq = spec.num_projections, spec.proj_len
    width = sample.keys.shape[1]
    folded_t = sample.folded.t()
    scaled = spec.hopfield_gamma

    def drive(state: list, n: int) -> torch.Tensor:
        if n == 0:  # the scores γ (q₀ + h W₀) Kᵀ, as γ q₀ Kᵀ + γ h F
            return torch.addmm(sample.const, state[1], sample.folded, alpha=scaled)
        if n == 1:  # W₀ s = F α (or W₀ s of the starting state, before any retrieval in this relaxation)
            u = (start_up + net.biases[0] if state[0] is None
                 else torch.addmm(net.biases[0], state[0].view(copies, -1), folded_t))
            if len(state) > 2:
                u = torch.addmm(u, state[2], net.weights[1])
            return u
        return net.layer_drive(inputs, state, n)

    def update(state: list, n: int, u: torch.Tensor) -> torch.Tensor:
        if n == 0:
            weights = torch.softmax(u.view(copies, P, Lq, width), dim=-1)
            if bool(sample.empty.any()):
                weights = weights.masked_fill(sample.empty.view(1, P, 1, 1), 0.0)
            return weights
        return net.update_layer(inputs, state, n, u, beta, target)

    state: list = [None, *fc]
    if start_up is None and spec.schedule == "synchronous":
        start_up = torch.zeros(copies, spec.layers[0], dtype=fc[0].dtype, device=fc[0].device)
    trace = _SampleTrace([], 0)
    first = 1 if residual == "fc" else 0
    previous_s = proj
    pending = []  # residuals as tensors: read back once at the end unless early exit needs each at once
    for _ in range(steps):
        new = run_schedule(spec.schedule, state, drive, update)
        if track or tol is not None:
            now, before = list(new[1:]), list(state[1:])
            if first == 0:
                s = _retrieved(sample, new[0], proj)
                now.append(s)
                before.append(previous_s)
                previous_s = s
            # one flat difference: a few large ops cost less than a reduction per layer on these small tensors
            res = (torch.cat([t.reshape(-1) for t in now]) - torch.cat([t.reshape(-1) for t in before])).abs_().max()
            pending.append(res)
        state = new
        trace.steps += 1
        if tol is not None and float(pending[-1]) < tol:
            break
    trace.residuals = torch.stack(pending).tolist() if pending else []
    return state[0], state[1:], trace
