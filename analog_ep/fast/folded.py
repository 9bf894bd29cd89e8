"""The first synapse folded onto each sequence's distinct keys: a relaxation with several times fewer multiply-adds
where sequences are short and word vectors wide (SNLI at the paper's shape), in fp32, equal to the exact path up
to the order of its sums.

The projection layer's state is a retrieval, sᵖ = α K with α = softmax(γ u Kᵀ + log count) over the U distinct
keys K of the sequence it reads, and it meets FC-1 only through the first synapse W₀:

- FC-1's bottom-up drive is W₀ s = Σ_{p,i,j} α_pij F_pij, with F_pij = W₀,pi k_pjᵀ (a row of H per query and key);
- the projection's drive u = q₀ + h W₀ enters only through the scores γ u Kᵀ = γ (q₀ Kᵀ + h F).

With F = W₀ Kᵀ (P·U·Lq rows of H) formed once per batch, every step takes
2·H·P·Lq·U multiply-adds for the two products instead of 2·H·P·Lq·d, and the (P, Lq, d) state is formed only
when the relaxation ends (and for the residual, where one is asked for). At snli-paper (d = 300, L = 25,
U ≈ 11 distinct words) that is ~25 times fewer per step, at SNLI's `cpu` preset (d = 102) ~8 times; at IMDB
(U ≈ 137 of 600 tokens, d = 300) the fold costs more than it saves, and `resolve_fold` says no.

The batch's words are folded once: F's columns for one key depend only on its vector and the projection, so
W₀ is applied to the batch's vocabulary of distinct keys per projection (one large matrix product; SNLI's
sentences share most of their words, ~4 uses per word at batch 256): each sample's F is a list of the
vocabulary's (Lq × H) blocks, read in place by the kernel and gathered into a dense tensor for torch's products.

Consecutive samples are relaxed together, a chunk whose folded synapses fit in half the last-level cache
(`CHUNK_BYTES`), through all their steps: one torch call per step serves the whole chunk, and a step's products
are matrix-vector products per sample. Where the AVX2 kernels load (`native/folded_avx2.c`), both products of a
synchronous step take one pass over each F (the alternating schedule's one at a time), for both ±β copies of
a nudged phase, skipping the padded keys.
The rows do not interact, so this is the same computation as the batched one. Early exit (`tol`) stops each
sample on its own residual (its state is kept from that step); the trace reports per step the largest residual
over the samples still running.

The exact path (`analog_ep.phi`, `hopfield`) is the oracle this module is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analog_ep.fast import native_kernels
from analog_ep.fast.retrieval import distinct_keys, key_vocabulary
from analog_ep.schedule import run_schedule
from analog_ep.state import Inputs, State

EPNet = Any  # `analog_ep.phi.EPNet` (annotations only)

REQUESTS = ("auto", "on", "off")  # `ep.fold_keys`
FOLDING_ESTIMATORS = ("ep_symmetric", "ep_two_phase")  # relax without autograd through the steps, on the exact path
# Fold where d ≥ this × L (L keys per sequence, an upper bound on its distinct ones): a folded step's products are
# matrix-vector products, below a batched matrix product's rate, so the fold must save at least this many
# multiply-adds. With our AVX2 kernel (both products in one pass) 3 (snli-cpu, d = 102 ≥ 3 × 25: 2.4× per batch);
# with torch's products 8 (snli-cpu folded with them: 2× slower than unfolded). docs/benchmarks.md.
MIN_WIDTH_RATIO = {"kernel": 3, "torch": 8}


def _half_last_level_cache(default: int = 16 << 20) -> int:
    """Half the CPU's last-level cache (Linux sysfs), else `default`: what the samples relaxed together may hold."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError):
        return default
    return max(size // 2, 1 << 20)


CHUNK_BYTES = _half_last_level_cache()  # folded synapses of the samples relaxed together, read at every step
MAX_FOLD_BYTES = 2 << 30  # the folded synapses of a batch are kept for its nudged phases: at most this much memory


def _fold_pays(spec: Any, batch: int, products: str) -> tuple[bool, str]:
    """Whether folding the first synapse onto the keys pays for this graph (with attention projections), batch
    size and step products ("kernel": our AVX2 kernel; "torch"), and why (or why not)."""
    ratio = MIN_WIDTH_RATIO[products]
    how = "the AVX2 kernel's products" if products == "kernel" else "torch's products (no AVX2 kernel here)"
    if spec.dim < ratio * spec.seq_len:
        return False, (f"token width d = {spec.dim} is below {ratio} × the {spec.seq_len} keys per sequence: with "
                       f"{how} folding would not save enough")
    size = 4 * batch * spec.layers[0] * spec.num_projections * spec.proj_len * spec.seq_len
    if size > MAX_FOLD_BYTES:
        return False, f"the folded synapses would take {size / 2**30:.1f} GiB (limit {MAX_FOLD_BYTES / 2**30:.0f})"
    return True, (f"first synapse folded onto each sequence's distinct keys (d = {spec.dim} ≥ {ratio} × "
                  f"L = {spec.seq_len}, {how})")


def resolve_fold(request: str, spec: Any, precision: str, estimator: str | None, batch: int, device: str = "cpu"
                 ) -> tuple[bool, str]:
    """(fold, reason) for `ep.fold_keys` = request; ConfigError where "on" cannot run. `estimator` None: free
    phases only (evaluation), which any estimator's run may fold."""
    from analog_ep.errors import ConfigError

    if request not in REQUESTS:
        raise ConfigError(f"ep.fold_keys = {request!r}; choose one of {', '.join(REQUESTS)}")
    if request == "off":
        return False, "off: requested"
    blockers = []
    if precision != "fp32":
        blockers.append(f"the run computes in {precision} (folding runs the fp32 products)")
    if estimator is not None and estimator not in FOLDING_ESTIMATORS:
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
    pays, why = _fold_pays(spec, batch, "kernel" if _kernel_for(torch.float32, torch.device(device)) else "torch")
    return pays, ("on: " if pays else "off: ") + why


@dataclass
class FoldChunk:
    """Consecutive samples' first synapses in key space, as rows of the batch's vocabulary blocks, padded to the
    chunk's largest number U of distinct keys (padded slots score −∞, so they take no weight whatever F holds)."""

    vocab_folded: torch.Tensor  # (V, Lq, H) the batch's folded blocks (`FoldedKeys.vocab_folded`)
    slots: torch.Tensor  # (c, P, U) int64: the vocabulary block of each sample's (projection, key)
    sizes: torch.Tensor  # (c, P) int64: distinct keys per projection (slots past it are padding)
    const: torch.Tensor  # (c, P·U·Lq): γ q₀ Kᵀ + log count; −inf where a slot holds no key
    keys: torch.Tensor  # (c, P, U, d): the distinct keys, zero past a projection's count

    @property
    def empty(self) -> torch.Tensor:
        """(c, P) bool: the projection has no key at all (its retrieval is zero)."""
        return self.sizes == 0

    def dense(self) -> torch.Tensor:
        """(c, P·U·Lq, H) each sample's folded synapse F, a row per (projection, key, query): the torch
        products' operand (the kernel reads the vocabulary's blocks in place)."""
        c, P, width = self.slots.shape
        return self.vocab_folded.index_select(0, self.slots.reshape(-1)).view(c, -1, self.vocab_folded.shape[2])


@dataclass
class FoldedKeys:
    """The per-batch operand of the folded relaxation (`Inputs.folded`): the first synapse applied to the batch's
    vocabulary, and each sample's distinct keys as indices into it. The nudged phases' rows are copies of the
    batch (row r reads sample r mod B)."""

    vocab_folded: torch.Tensor  # (V, Lq, H): W₀ of projection p on a distinct key of the batch, for every p
    slots: torch.Tensor  # (B, P, U) each sample's distinct keys as vocabulary blocks (0 past its count)
    keys: torch.Tensor  # (B, P, U, d) each sample's distinct keys, zero past its count
    sizes: torch.Tensor  # (B, P) how many distinct keys each sample's projection reads
    const: torch.Tensor  # (B, P, U, Lq) γ q₀ Kᵀ + log count

    @property
    def batch(self) -> int:
        return self.sizes.shape[0]

    def chunks(self) -> list[range]:
        """Consecutive samples whose folded synapses together fit in `CHUNK_BYTES` (at least one sample each)."""
        per_key = 4 * self.vocab_folded[0].numel()
        total = (self.sizes.sum(1) * per_key).tolist()
        out, first, held = [], 0, 0
        for b, size in enumerate(total):
            if b > first and held + size > CHUNK_BYTES:
                out.append(range(first, b))
                first, held = b, 0
            held += size
        out.append(range(first, self.batch))
        return out

    def chunk(self, samples: range) -> FoldChunk:
        picked = slice(samples.start, samples.stop)
        sizes = self.sizes[picked]
        width = max(int(sizes.max()), 1)
        c = len(samples)
        return FoldChunk(self.vocab_folded, self.slots[picked, :, :width].contiguous(), sizes.contiguous(),
                         self.const[picked, :, :width].reshape(c, -1).contiguous(), self.keys[picked, :, :width])


def prepare(net: EPNet, inputs: Inputs) -> Inputs:
    """The exact path's inputs with the folded operand attached (`EPNet.prepare(x, fold=True)`)."""
    if not net.spec.attention or inputs.keys is None:
        raise ValueError("folding needs attention projections (the retrieval's keys)")
    spec = net.spec
    P, Lq = spec.num_projections, spec.proj_len
    keys = inputs.keys  # (B, P, L, d)
    B, _, length, d = keys.shape
    mask = None if inputs.key_mask is None else inputs.key_mask.reshape(B * P, length)
    distinct, counts, sizes = distinct_keys(keys.reshape(B * P, length, d), mask)
    width = max(int(sizes.max()), 1)
    distinct, counts, sizes = distinct[:, :width].view(B, P, width, d), counts[:, :width].view(B, P, width), \
        sizes.view(B, P)
    hidden = net.weights[0].shape[0]
    # W₀ per projection with rows (query, unit): (P, Lq·H, d)
    weights = net.weights[0].detach().view(hidden, P, Lq, d).permute(1, 2, 0, 3).reshape(P, Lq * hidden, d)
    vocabularies = [key_vocabulary(distinct[:, p].reshape(-1, d), (counts[:, p] > 0).reshape(-1)) for p in range(P)]
    sizes_v = [vocab.shape[0] for vocab, _ in vocabularies]
    blocks = torch.empty(sum(sizes_v), Lq * hidden, dtype=weights.dtype, device=weights.device)
    slots, offset = [], 0
    for p, (vocab, index) in enumerate(vocabularies):  # each projection's blocks written in place: no copy of all
        torch.mm(vocab, weights[p].t(), out=blocks[offset:offset + sizes_v[p]])
        slots.append(index.view(B, width) + offset)
        offset += sizes_v[p]
    const = torch.einsum("bpud,bpqd->bpuq", distinct, inputs.query_drive).mul_(spec.hopfield_gamma)
    const = const.add_(counts.log().unsqueeze(3))  # log 0 = −inf: slots without a key take no weight
    inputs.folded = FoldedKeys(blocks.view(-1, Lq, hidden), torch.stack(slots, 1), distinct, sizes, const)
    return inputs


def _kernel_for(dtype: torch.dtype, device: torch.device) -> Any:
    """The AVX2 kernel library where it serves this relaxation (fp32 on the CPU), else None."""
    if dtype != torch.float32 or device.type != "cpu":
        return None
    return native_kernels.library(native_kernels.AVX2)


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
    kernel = _kernel_for(state[1].dtype, state[1].device)
    out = [torch.empty_like(s) for s in state]
    traces = []
    for samples in fold.chunks():
        # the chunk's rows, sample-major: (sample, copy)
        idx = (torch.arange(copies, device=start.device) * fold.batch
               + torch.tensor(samples, device=start.device).unsqueeze(1)).reshape(-1)
        chunk = fold.chunk(samples)
        beta_c = beta[idx] if isinstance(beta, torch.Tensor) else beta
        target_c = None if target is None else target[idx]  # `dynamics.relax` passes a target only when nudging
        up_c = None if start_up is None else start_up[idx]
        proj = state[0][idx]
        final, trace = _relax_chunk(net, inputs, chunk, kernel, proj, [s[idx] for s in state[1:]], up_c, steps,
                                    beta_c, target_c, tol, track, residual)
        for o, s in zip(out, final):
            o[idx] = s.to(o.dtype)
        traces.append(trace)
    taken = max(t.steps for t in traces)
    residuals = [max(t.residuals[i] for t in traces if i < len(t.residuals)) for i in range(taken)] if (
        track or tol is not None) else []
    return out, residuals, taken


@dataclass
class _ChunkTrace:
    residuals: list[float]  # per step: the largest residual over the chunk's samples still running
    steps: int


def _retrieved(chunk: FoldChunk, attention: torch.Tensor, copies: int) -> torch.Tensor:
    """(c·copies, P, Lq, d) the projection state from attention weights (c·copies, P·U·Lq): α K."""
    c, P, width, d = chunk.keys.shape
    alpha = attention.view(c, copies, P, width, -1).transpose(-1, -2)  # (c, copies, P, Lq, U)
    return torch.matmul(alpha, chunk.keys.unsqueeze(1)).view(c * copies, P, -1, d)


def _relax_chunk(net: EPNet, inputs: Inputs, chunk: FoldChunk, kernel: Any, proj: torch.Tensor, fc: State,
                 start_up: torch.Tensor | None, steps: int, beta: float | torch.Tensor, target: torch.Tensor | None,
                 tol: float | None, track: bool, residual: str) -> tuple[State, _ChunkTrace]:
    spec = net.spec
    rows = fc[0].shape[0]
    c, P, width = chunk.slots.shape
    Lq, hidden = spec.proj_len, spec.layers[0]
    copies, n_cols = rows // c, chunk.const.shape[1]
    gamma = spec.hopfield_gamma
    const = chunk.const.unsqueeze(1)  # (c, 1, N): the same for every copy
    dense = chunk.dense() if kernel is None else None  # (c, N, H)
    empty = chunk.empty.view(c, 1, P, 1, 1) if bool(chunk.empty.any()) else None

    def scores(state: list) -> torch.Tensor:  # γ (q₀ + h W₀) Kᵀ, as γ q₀ Kᵀ + γ F h
        if kernel is not None:
            return kernel_products(state, want_scores=True, want_up=False)[0]
        return torch.baddbmm(const, state[1].view(c, copies, hidden), dense.transpose(1, 2), alpha=gamma)

    def fc_drive(state: list, products: torch.Tensor | None = None) -> torch.Tensor:  # W₀ s = Fᵀ α, bias, top-down
        if state[0] is None:  # no retrieval yet in this relaxation: W₀ s of the starting state
            u = start_up + net.biases[0]
        else:
            if products is None:
                products = (kernel_products(state, want_scores=False, want_up=True)[1] if kernel is not None
                            else torch.bmm(state[0].view(c, copies, n_cols), dense))
            u = products.view(rows, hidden).add_(net.biases[0])
        return torch.addmm(u, state[2], net.weights[1]) if len(state) > 2 else u

    def kernel_products(state: list, want_scores: bool, want_up: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The scores' product γ F h (plus the constant) and/or FC-1's Fᵀ α, in one pass over each sample's F."""
        first = torch.empty(c, copies, n_cols) if want_scores else None
        products = torch.empty(c, copies, hidden) if want_up else None
        h = state[1].contiguous() if want_scores else None
        alpha = state[0].contiguous() if want_up else None
        kernel.seqep_fold_products(chunk.vocab_folded.data_ptr(), chunk.slots.data_ptr(), chunk.sizes.data_ptr(),
                                   _pointer(h), _pointer(alpha), chunk.const.data_ptr(), gamma, _pointer(first),
                                   _pointer(products), c, copies, P, width, Lq, hidden, torch.get_num_threads())
        return first, products

    def all_drives(state: list) -> list:  # synchronous steps: both products from one pass of the kernel
        first, products = kernel_products(state, want_scores=True, want_up=state[0] is not None)
        return [first, fc_drive(state, products)] + [net.layer_drive(inputs, state, n) for n in range(2, len(state))]

    def drive(state: list, n: int) -> torch.Tensor:
        if n == 0:
            return scores(state)
        return fc_drive(state) if n == 1 else net.layer_drive(inputs, state, n)

    def update(state: list, n: int, u: torch.Tensor) -> torch.Tensor:
        if n == 0:  # softmax over each query's keys: the U axis of (c, copies, P, U, Lq)
            weights = torch.softmax(u.view(c, copies, P, width, Lq), dim=3)
            if empty is not None:
                weights = weights.masked_fill(empty, 0.0)
            return weights.view(rows, -1)
        return net.update_layer(inputs, state, n, u, beta, target)

    if start_up is None and spec.schedule == "synchronous":
        start_up = torch.zeros(rows, hidden, dtype=fc[0].dtype, device=fc[0].device)
    state: list = [None, *fc]
    final: list = [None, *fc]  # each sample's state at its exit (early exit), else the last state
    running = torch.ones(c, dtype=torch.bool, device=fc[0].device)
    trace = _ChunkTrace([], 0)
    first = 1 if residual == "fc" else 0
    previous_s = proj
    pending = []  # per-step residuals as tensors: read back once at the end unless early exit needs each at once
    for _ in range(steps):
        new = run_schedule(spec.schedule, state, drive, update, all_drives if kernel is not None else None)
        trace.steps += 1
        if not (track or tol is not None):
            state = new
            continue
        moved = [(a - b).abs_().view(c, -1).amax(1) for a, b in zip(new[1:], state[1:])]
        if first == 0:
            s = _retrieved(chunk, new[0], copies)
            moved.append((s - previous_s).abs_().view(c, -1).amax(1))
            previous_s = s
        per_sample = torch.stack(moved).amax(0)  # (c,)
        state = new
        if tol is None:
            pending.append(per_sample.max())
            continue
        values = per_sample.tolist()
        live = running.tolist()
        trace.residuals.append(max(v for v, r in zip(values, live) if r))
        done = running & (per_sample < tol)
        if bool(done.any()):
            final = _keep(final, state, done, copies)
            running &= ~done
            if not bool(running.any()):
                break
    if tol is None:
        final = state
    elif bool(running.any()):  # the samples that ran all the steps
        final = _keep(final, state, running, copies)
    if pending:
        trace.residuals = torch.stack(pending).tolist()
    proj_out = proj if final[0] is None else _retrieved(chunk, final[0], copies)
    return [proj_out, *final[1:]], trace


def _keep(final: list, state: list, samples: torch.Tensor, copies: int) -> list:
    """`final` with the rows of the chosen samples (c,) bool taken from `state` (a layer not kept yet takes all
    of `state`'s rows: every sample's are written when it stops)."""
    rows = samples.repeat_interleave(copies)

    def take(kept: torch.Tensor | None, now: torch.Tensor | None) -> torch.Tensor | None:
        if now is None or kept is None:
            return kept if now is None else now
        return torch.where(rows.view(-1, *[1] * (now.dim() - 1)), now, kept)

    return [take(kept, now) for kept, now in zip(final, state)]
