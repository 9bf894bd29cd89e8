"""The folded relaxation (`analog_ep.fast.folded`) against the exact path, its oracle."""

from __future__ import annotations

import pytest
import torch

from analog_ep import EPConfig, EPNet, build_spec, relax
from analog_ep.bench.shapes import build_shape
from analog_ep.dynamics import free_phase
from analog_ep.errors import ConfigError
from analog_ep.estimators import ep_symmetric, ep_two_phase
from analog_ep.fast import folded, native_kernels
from analog_ep.fast.folded import resolve_fold


def _pairs(spec, batch: int = 5, seed: int = 0) -> torch.Tensor:
    """Sentence pairs with padding, repeated words and one sample whose hypothesis is empty."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.num_streams, spec.seq_len, spec.dim, generator=g, dtype=torch.float64)
    x[:, :, 4:] = 0  # padding
    x[:, :, 2] = x[:, :, 0]  # a repeated word
    x[-1, 1] = 0  # an empty hypothesis: masked, its projections retrieve nothing
    return x


SPECS = [dict(schedule=s, mask_padding=m, pool_queries=q) for s in ("synchronous", "alternating")
         for m in (False, True) for q in (0, 3)]


@pytest.mark.parametrize("options", SPECS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_folded_phases_reach_the_exact_paths_states(options):
    spec = build_spec("snli", tiny=True, bias_offset=1.0, **options)
    net = EPNet(spec, seed=1).double()
    x = _pairs(spec)
    exact_free, exact_trace = free_phase(net, net.prepare(x), 25)
    folded_free, folded_trace = free_phase(net, net.prepare(x, fold=True), 25)
    for a, b in zip(exact_free, folded_free):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert folded_trace.steps == exact_trace.steps == 25
    assert folded_trace.residuals == pytest.approx(exact_trace.residuals, abs=1e-12)
    target = torch.nn.functional.one_hot(torch.arange(5) % spec.num_classes, spec.num_classes).double()
    betas = torch.tensor([0.5] * 5 + [-0.5] * 5, dtype=torch.float64).view(-1, 1)
    nudged = []
    for inputs, free in ((net.prepare(x), exact_free), (net.prepare(x, fold=True), folded_free)):
        start_inputs, start = net.nudge_start(inputs, free, times=2)
        nudged.append(relax(net, start_inputs, start, 8, beta=betas, target=target.repeat(2, 1), track=False)[0])
    for a, b in zip(*nudged):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_early_exit_stops_each_sample_on_its_own_residual():
    spec = build_spec("snli", tiny=True, bias_offset=1.0)
    net = EPNet(spec, seed=0).double()
    x = _pairs(spec, batch=6)
    exact, exact_trace = free_phase(net, net.prepare(x), 200, tol=1e-9)
    folded, folded_trace = free_phase(net, net.prepare(x, fold=True), 200, tol=1e-9)
    assert folded_trace.steps == exact_trace.steps < 200  # the slowest sample sets the batch's step count
    assert folded_trace.final_residual < 1e-9
    for a, b in zip(exact, folded):
        assert torch.allclose(a, b, rtol=0, atol=1e-8)


@pytest.mark.parametrize("estimator", [ep_symmetric, ep_two_phase])
def test_ep_gradients_are_the_same_folded_or_not(estimator):
    spec = build_spec("snli", tiny=True, bias_offset=1.0)
    net = EPNet(spec, seed=2).double()
    x, y = _pairs(spec, batch=4, seed=3), torch.tensor([0, 1, 2, 1])
    plain = estimator(net, x, y, EPConfig(beta=0.5, free_steps=20, nudge_steps=6))
    folded = estimator(net, x, y, EPConfig(beta=0.5, free_steps=20, nudge_steps=6, fold=True))
    for name, g in plain.grads.items():
        assert torch.allclose(g, folded.grads[name], rtol=1e-9, atol=1e-12), name


def test_folding_is_refused_where_it_cannot_run_and_chosen_where_it_pays():
    snli_paper = build_shape("snli-paper").spec
    assert resolve_fold("auto", snli_paper, "fp32", "ep_symmetric", 256)[0]
    off, why = resolve_fold("auto", build_shape("imdb-paper").spec, "fp32", "ep_symmetric", 32)
    assert not off and "token width" in why
    assert not resolve_fold("auto", snli_paper, "bf16", "ep_symmetric", 256)[0]
    assert "launches" in resolve_fold("auto", snli_paper, "fp32", "ep_symmetric", 256, "cuda")[1]
    assert resolve_fold("off", snli_paper, "fp32", "ep_symmetric", 256) == (False, "off: requested")
    with pytest.raises(ConfigError, match="computes in int8"):
        resolve_fold("on", snli_paper, "int8", "ep_symmetric", 256)
    with pytest.raises(ConfigError, match="estimator bptt"):
        resolve_fold("on", snli_paper, "fp32", "bptt", 256)
    assert resolve_fold("on", build_spec("snli", tiny=True), "fp32", "ep_two_phase", 8) == (True, "on: requested")
    with pytest.raises(ConfigError, match="no attention projection"):
        resolve_fold("on", build_spec("imdb", tiny=True, attention=False), "fp32", "ep_symmetric", 8)


def test_the_width_folding_needs_depends_on_the_products_a_step_runs(monkeypatch):
    snli_cpu = build_shape("snli-cpu").spec  # d = 102, L = 25
    monkeypatch.setattr(folded, "_kernel_for", lambda *args: object())
    on, why = resolve_fold("auto", snli_cpu, "fp32", "ep_symmetric", 64)
    assert on and "AVX2 kernel" in why
    monkeypatch.setattr(folded, "_kernel_for", lambda *args: None)
    on, why = resolve_fold("auto", snli_cpu, "fp32", "ep_symmetric", 64)
    assert not on and "below 8 ×" in why and "torch's products" in why
    assert resolve_fold("auto", build_shape("snli-paper").spec, "fp32", "ep_symmetric", 256)[0]  # 300 ≥ 8 × 25


def test_folded_inputs_refuse_what_needs_every_full_state():
    spec = build_spec("snli", tiny=True)
    net = EPNet(spec, seed=0)
    inputs = net.prepare(torch.randn(2, 2, spec.seq_len, spec.dim), fold=True)
    with pytest.raises(ValueError, match="record_phi"):
        free_phase(net, inputs, 5, record_phi=True)
    with pytest.raises(ValueError, match="fp32"):
        net.prepare(torch.randn(2, 2, spec.seq_len, spec.dim), precision="bf16", fold=True)


def test_ep_with_folding_measures_the_residual_on_the_fc_layers_and_exits_as_the_exact_path_does():
    spec = build_spec("snli", tiny=True, bias_offset=1.0)
    net = EPNet(spec, seed=4).double()
    x, y = _pairs(spec, batch=4, seed=5), torch.tensor([2, 0, 1, 1])
    cfg = EPConfig(beta=0.5, free_steps=200, nudge_steps=6, tol=1e-8)
    plain = ep_symmetric(net, x, y, cfg)
    folded = ep_symmetric(net, x, y, EPConfig(beta=0.5, free_steps=200, nudge_steps=6, tol=1e-8, fold=True))
    fc_only, _ = free_phase(net, net.prepare(x), 200, tol=1e-8, residual="fc")
    assert folded.free_trace.steps <= plain.free_trace.steps  # FC layers settle first: never later
    assert torch.allclose(folded.output, plain.output, atol=1e-7)
    assert torch.allclose(folded.output, fc_only[-1], atol=1e-12)


needs_avx2_kernel = pytest.mark.skipif(native_kernels.library(native_kernels.AVX2) is None,
                                       reason=f"AVX2 kernels: {native_kernels.unavailable_reason(native_kernels.AVX2)}")


@needs_avx2_kernel
@pytest.mark.parametrize("copies", [1, 2, 3])
@pytest.mark.parametrize("lq, hidden", [(25, 400), (7, 13), (1, 8)])
def test_the_avx2_kernel_takes_both_products_as_torch_does(copies: int, lq: int, hidden: int) -> None:
    """`native/folded_avx2.c` against float64 products of the same gathered rows: padded slots score their
    constant (−∞) and add nothing; a projection without keys adds nothing either."""
    g = torch.Generator().manual_seed(lq * 100 + copies)
    c, P, U, V = 3, 2, 4, 9
    vocab = torch.randn(V, lq, hidden, generator=g)
    slots = torch.randint(0, V, (c, P, U), generator=g)
    sizes = torch.tensor([[4, 2], [1, 0], [3, 4]])
    const = torch.randn(c, P, U, lq, generator=g)
    const[torch.arange(U).view(1, 1, U) >= sizes.unsqueeze(-1)] = float("-inf")
    const = const.reshape(c, -1)
    h = torch.rand(c, copies, hidden, generator=g)
    alpha = torch.rand(c, copies, P, U, lq, generator=g)
    alpha[(torch.arange(U).view(1, 1, U) >= sizes.unsqueeze(-1)).unsqueeze(1).expand(c, copies, P, U)] = 0.0
    alpha = alpha.reshape(c, copies, -1)
    kernel = native_kernels.library(native_kernels.AVX2).seqep_fold_products
    scores, up = torch.empty(c, copies, const.shape[1]), torch.empty(c, copies, hidden)
    kernel(vocab.data_ptr(), slots.data_ptr(), sizes.data_ptr(), h.data_ptr(), alpha.data_ptr(), const.data_ptr(), 0.3,
           scores.data_ptr(), up.data_ptr(), c, copies, P, U, lq, hidden, 2)
    scores_only, up_only = torch.empty_like(scores), torch.empty_like(up)  # one product at a time: NULL for the other
    kernel(vocab.data_ptr(), slots.data_ptr(), sizes.data_ptr(), h.data_ptr(), None, const.data_ptr(), 0.3,
           scores_only.data_ptr(), None, c, copies, P, U, lq, hidden, 2)
    kernel(vocab.data_ptr(), slots.data_ptr(), sizes.data_ptr(), None, alpha.data_ptr(), const.data_ptr(), 0.3,
           None, up_only.data_ptr(), c, copies, P, U, lq, hidden, 1)
    assert torch.equal(scores_only, scores) and torch.equal(up_only, up)  # the same sums in the same order
    dense = vocab.double().index_select(0, slots.reshape(-1)).view(c, -1, hidden)  # (c, N, H)
    want_scores = const.unsqueeze(1).double() + 0.3 * torch.bmm(h.double(), dense.transpose(1, 2))
    want_up = torch.bmm(alpha.double(), dense)
    padded = torch.isinf(want_scores)
    assert torch.equal(padded, torch.isinf(scores)) and bool((scores[padded] < 0).all())
    assert torch.allclose(scores[~padded].double(), want_scores[~padded], rtol=1e-5, atol=1e-5)
    assert torch.allclose(up.double(), want_up, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tol", [None, 1e-9])
def test_samples_relaxed_together_or_one_by_one_reach_the_same_states(monkeypatch, tol) -> None:
    spec = build_spec("snli", tiny=True, bias_offset=1.0)
    net = EPNet(spec, seed=6).double()
    x = _pairs(spec, batch=7, seed=8)
    together, t_trace = free_phase(net, net.prepare(x, fold=True), 120, tol=tol)
    monkeypatch.setattr(folded, "CHUNK_BYTES", 1)  # every sample a chunk of its own
    inputs = net.prepare(x, fold=True)
    assert [len(r) for r in inputs.folded.chunks()] == [1] * 7
    alone, a_trace = free_phase(net, inputs, 120, tol=tol)
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert t_trace.steps == a_trace.steps and t_trace.residuals == pytest.approx(a_trace.residuals, abs=1e-12)


@needs_avx2_kernel
@pytest.mark.parametrize("schedule", ["synchronous", "alternating"])
def test_the_kernels_relaxation_matches_torchs_in_fp32(monkeypatch, schedule: str) -> None:
    """Free and nudged phases in fp32: the AVX2 kernel's steps (both products in one pass, or one at a time)
    against the torch products' (the oracle)."""
    spec = build_spec("snli", tiny=True, bias_offset=1.0, schedule=schedule)
    assert folded._kernel_for(torch.float32, torch.device("cpu")) is not None
    net = EPNet(spec, seed=9)
    x = _pairs(spec, batch=6, seed=10).float()
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    cfg = EPConfig(beta=0.5, free_steps=30, nudge_steps=8, fold=True)
    with_kernel = ep_symmetric(net, x, y, cfg)
    monkeypatch.setattr(folded, "_kernel_for", lambda *args: None)
    with_torch = ep_symmetric(net, x, y, cfg)
    assert torch.allclose(with_kernel.output, with_torch.output, atol=1e-5)
    for name, g in with_torch.grads.items():
        assert torch.allclose(with_kernel.grads[name], g, rtol=1e-3, atol=1e-5), name
