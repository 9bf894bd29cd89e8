"""`seqep bench` and the fast (bf16, early-exit) path: report fields, FLOP count, gradient fidelity, exact path."""

import copy
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from analog_ep import bench, reference
from analog_ep.cli import main
from analog_ep.data.ngrams import slots
from analog_ep.dynamics import free_phase, predict
from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, ep_symmetric, ep_two_phase, make_estimator
from analog_ep.fast.lowp_weights import UP_MAX_ROWS, Bf16Weight, Int8Weight, int8_available
from analog_ep.gdu import angle_deg
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.config import load_preset
from tests.helpers import random_inputs, small_net

RECORD_FIELDS = {"shape", "batch", "seconds_per_batch", "speedup_vs_reference", "gflops", "peak_fraction",
                 "peak_rss_mb", "flops", "flops_executed", "relax_gflops", "phases", "reference", "inference", "load"}


def flat(grads):
    return torch.cat([grads[k].flatten().double() for k in sorted(grads)])


def test_bench_json_has_the_documented_fields(capsys):
    code = main(["bench", "--shape", "imdb-tiny", "--batch", "4", "--json", "--in-process", "--no-compile",
                 "--peak-size", "256", "--check-fidelity", "--fidelity-batch", "2", "--warmup", "1",
                 "--precision", "bf16-emulated"])  # bf16 here, even on a CPU that emulates it
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"machine", "settings", "peaks", "results", "flop_formula"} <= set(report)
    assert report["peaks"]["fp32_gflops"] > 0 and report["peaks"]["bf16_gflops"] > 0
    measured = report["peaks"]["measured"]  # before and after the measurements: the best one is the peak
    assert len(measured) == 2 and report["peaks"]["bf16_gflops"] == max(m["bf16_gflops"] for m in measured)
    (rec,) = report["results"]
    assert rec["relax_peak_fraction"] == pytest.approx(rec["relax_gflops"] / report["peaks"]["bf16_gflops"])
    assert RECORD_FIELDS <= set(rec)
    assert rec["shape"] == "imdb-tiny" and rec["batch"] == 4
    assert rec["seconds_per_batch"] > 0 and rec["speedup_vs_reference"] > 0
    assert rec["inference"]["samples_per_s"] > 0
    assert 0 < rec["phases"]["free_steps"] <= 50 and 0 < rec["phases"]["nudge_steps"] <= 25
    assert rec["flops_executed"] <= rec["flops"]
    assert math.isfinite(rec["fidelity"]["angle_deg"])
    assert report["settings"]["inputs"] == "auto" and rec["inputs"] == "random"  # test shapes have no real data
    assert rec["key_fraction"] == 1.0  # random vectors never repeat: the full retrieval
    assert rec["precision"] == "bf16" and rec["precision_reason"].startswith("bf16: requested")  # nothing timed


def token_batch(spec, batch: int, vocab: int = 9, seed: int = 0):
    """Inputs shaped like embedded text: words of a small vocabulary (they repeat) and zero padding."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(vocab, spec.dim, generator=g)
    x = words[torch.randint(0, vocab, (batch, spec.num_streams, spec.seq_len), generator=g)]
    for b, real in enumerate(torch.randint(spec.seq_len // 4, spec.seq_len + 1, (batch,), generator=g).tolist()):
        x[b, :, real:] = 0
    return x, torch.randint(0, spec.num_classes, (batch,), generator=g)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_fast_update_with_repeated_words_is_faithful(mask_padding, monkeypatch):
    """The retrieval over distinct keys is exact: with it the fast path's update is as close to float64 as
    without it (every key kept), and both are within a few degrees."""
    from analog_ep.fast import retrieval as fast_retrieval

    spec = small_net("imdb", mask_padding=mask_padding).spec
    x, y = token_batch(spec, 8)
    assert fast_retrieval.kept_fraction(x, (x != 0).any(-1) if mask_padding else None) < 0.5
    cfg = EPConfig(0.1, 40, 15)
    exact64 = flat(ep_symmetric(EPNet(spec, seed=0).double(), x.double(), y, cfg, set_grad=False).grads)
    fast = flat(ep_symmetric(EPNet(spec, seed=0), x, y, replace_precision(cfg, "bf16"), set_grad=False).grads)
    monkeypatch.setattr(fast_retrieval, "distinct_keys", lambda keys, mask: (
        keys * (1 if mask is None else mask.unsqueeze(-1)), torch.ones(keys.shape[:2]) if mask is None
        else mask.to(keys.dtype), torch.full((keys.shape[0],), keys.shape[1])))
    every_key = flat(ep_symmetric(EPNet(spec, seed=0), x, y, replace_precision(cfg, "bf16"), set_grad=False).grads)
    assert angle_deg(fast, exact64) < 3.0
    assert angle_deg(fast, every_key) < 1.0


def test_flop_count_matches_a_hand_count():
    """imdb tiny: L=12, d=8, FC 96 → 32 → 10 → 2, one projection with attention."""
    spec = build_spec("imdb", tiny=True)
    step = 2 * 2 * (96 * 32 + 32 * 10 + 10 * 2) + 4 * 12 * 12 * 8  # two products per synapse + Hopfield
    grad = 2 * (96 * 32 + 32 * 10 + 10 * 2) + 2 * 12 * 8 * 8  # ∂Φ/∂W and ∂Φ/∂W0 per stacked row
    prep = 2 * 12 * 8 * 8  # X W0ᵀ
    B, T, K = 3, 7, 4
    expected = B * prep + B * T * step + 2 * B * K * step + 2 * B * grad
    flops = bench.count_flops(spec, B, T, K)
    assert flops["step_per_sample"] == step
    assert flops["total"] == expected


@pytest.mark.parametrize("model", ["imdb", "snli"])
def test_flop_count_matches_torch_flop_counter_on_the_exact_path(model):
    net = EPNet(build_spec(model, tiny=True, bias_offset=1.0), seed=0).double()
    x, y = random_inputs(net.spec, 3)
    cfg = EPConfig(0.1, 6, 4)
    with FlopCounterMode(display=False) as counter:
        ep_symmetric(net, x, y, cfg, set_grad=False)
    assert counter.get_total_flops() == bench.count_flops(net.spec, 3, 6, 4)["total"]


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("model", ["imdb", "snli"])
def test_low_precision_update_is_within_a_few_degrees_of_float64(model, precision):
    if precision == "int8" and not int8_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    net = small_net(model)
    assert net.low_precision_weights(precision)[0] is not None  # the big synapse really runs in low precision
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    beta = 0.1 if model == "imdb" else 0.5
    exact64 = ep_symmetric(small_net(model).double(), x.double(), y, EPConfig(beta, 40, 15), set_grad=False).grads
    fast = ep_symmetric(net, x, y, EPConfig(beta, 40, 15, precision=precision), set_grad=False).grads
    assert angle_deg(flat(fast), flat(exact64)) < 3.0
    net.release_low_precision()


@pytest.mark.skipif(not int8_available(), reason="this torch build has no oneDNN int8 linear")
def test_int8_weight_products_match_fp32_in_both_orientations():
    """Both pre-packed orientations (x Wᵀ and h W) against fp32, including an all-zero row. The transposed
    one is packed from a contiguous copy: packed from a transposed view it came out as noise (rel. error 1.4)."""
    gen = torch.Generator().manual_seed(0)
    w = (torch.rand(48, 520, generator=gen) * 2 - 1) / 520 ** 0.5
    int8 = Int8Weight(w)
    x, h = torch.randn(5, 520, generator=gen), torch.rand(5, 48, generator=gen)
    x[2], h[3] = 0.0, 0.0
    for got, want, zero_row in ((int8.up(x).float(), x @ w.t(), 2), (int8.down(h).float(), h @ w, 3)):
        assert ((got - want).norm() / want.norm()).item() < 0.03
        assert got[zero_row].abs().max() == 0  # the zero row stays exactly zero


def test_unknown_low_precision_kind_is_refused():
    with pytest.raises(ValueError, match="bf16' or 'int8"):
        small_net().low_precision_weights("fp8")


def test_plain_bf16_nudged_phase_would_lose_the_contrast():
    """Why the nudged phases are written as differences from s*: without it the EP signal drowns in rounding."""
    net = small_net()
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    cfg = EPConfig(0.1, 40, 15)
    exact = flat(ep_symmetric(small_net().double(), x.double(), y, cfg, set_grad=False).grads)
    inputs = net.prepare(x, "bf16")
    free, _ = free_phase(net, inputs, cfg.free_steps)
    target = torch.nn.functional.one_hot(y, 2).float()
    from analog_ep.dynamics import relax
    from analog_ep.estimators import signed_coef, stack_states

    betas = signed_coef(8, cfg.beta, free[-1]).view(-1, 1)
    inputs2 = inputs.repeat(2)
    naive, _ = relax(net, inputs2, stack_states(free, free), cfg.nudge_steps, beta=betas, target=target.repeat(2, 1))
    grads = net.phi_param_grads(inputs2, naive, signed_coef(8, -1.0 / (2 * cfg.beta * 8), free[-1]))
    delta = flat(ep_symmetric(net, x, y, replace_precision(cfg, "bf16"), set_grad=False).grads)
    assert angle_deg(flat(grads), exact) > 3 * angle_deg(delta, exact)


def replace_precision(cfg: EPConfig, precision: str) -> EPConfig:
    from dataclasses import replace

    return replace(cfg, precision=precision)


def test_exact_path_is_unchanged_and_the_default():
    net = EPNet(build_spec("snli", tiny=True, bias_offset=1.0), seed=1).double()
    x, y = random_inputs(net.spec, 5)
    assert net.prepare(x).lowp is None
    default = ep_symmetric(net, x, y, EPConfig(0.2, 30, 10), set_grad=False).grads
    explicit = ep_symmetric(net, x, y, EPConfig(0.2, 30, 10, precision="fp32", nudge_tol=None), set_grad=False).grads
    oracle = reference.reference_ep_symmetric(net, x, y, 0.2, 30, 10)
    for name in oracle:
        assert torch.equal(default[name], explicit[name])
        torch.testing.assert_close(default[name], oracle[name])


@pytest.mark.parametrize("variant", [dict(model="imdb", pool_queries=3, mask_padding=True),
                                     dict(model="imdb", attention=False), dict(model="mlp")])
def test_bf16_path_runs_on_every_graph_kind(variant):
    options = dict(variant)
    spec = build_spec(options.pop("model"), tiny=True, bias_offset=1.0, **options)
    net = EPNet(spec, seed=0)
    x, y = random_inputs(spec, 6, dtype=torch.float32)
    if spec.mask_padding:
        x[:2, :, -4:] = 0
    cfg = EPConfig(0.1, 30, 10)
    exact = flat(ep_symmetric(EPNet(spec, seed=0).double(), x.double(), y, cfg, set_grad=False).grads)
    for estimator in (ep_symmetric, ep_two_phase):
        fast = estimator(net, x, y, replace_precision(cfg, "bf16"), set_grad=False)
        assert all(torch.isfinite(g).all() for g in fast.grads.values())
    fast = flat(ep_symmetric(net, x, y, replace_precision(cfg, "bf16"), set_grad=False).grads)
    assert angle_deg(fast, exact) < 5.0
    assert (predict(net, x, 30, precision="bf16") == predict(net, x, 30)).float().mean() >= 0.8


def test_early_exit_saves_nudged_steps_and_keeps_the_update():
    net = small_net()
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    full = ep_symmetric(net, x, y, EPConfig(0.1, 40, 25, precision="bf16"), set_grad=False)
    timer = bench.PhaseTimer()
    with timer:
        early = ep_symmetric(net, x, y, EPConfig(0.1, 40, 25, precision="bf16", tol=1e-3, nudge_tol=1e-5),
                             set_grad=False)
    (_, free_steps), (_, nudge_steps) = timer.records
    assert nudge_steps < 25
    assert angle_deg(flat(early.grads), flat(full.grads)) < 1.0


def test_low_precision_weights_follow_in_place_updates():
    """Fused Adam moves parameters without bumping their version: the bf16 copies must follow anyway."""
    net = small_net()
    first = net.low_precision_weights()[0].w
    opt = torch.optim.Adam(net.parameters(), lr=0.1, fused=True)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    second = net.low_precision_weights()[0].w
    assert second is first  # the same buffer, refreshed in place
    torch.testing.assert_close(second.float(), net.weights[0].detach(), rtol=1e-2, atol=1e-3)
    net.release_low_precision()
    assert net._lowp_cache is None


def test_shapes_build_from_the_presets():
    imdb = bench.build_shape("imdb-paper")
    assert (imdb.spec.seq_len, imdb.spec.dim, imdb.spec.layers) == (600, 300, (1000, 40, 2))
    assert (imdb.free_steps, imdb.nudge_steps, imdb.spec.schedule) == (50, 25, "synchronous")
    snli = bench.build_shape("snli-paper")
    assert (snli.spec.seq_len, snli.spec.dim, snli.spec.layers, snli.batches) == (25, 300, (400, 3), (256,))
    preset = load_preset("imdb", "cpu")
    cpu = bench.build_shape("imdb-cpu")
    assert cpu.spec.dim == bench.vectors_dim(preset.data.vectors)
    assert cpu.spec.seq_len == slots(preset.data.max_len, preset.data.ngrams)  # the words, then the word pairs
    assert cpu.spec.layers == (*preset.model.hidden, 2) and cpu.free_steps == preset.ep.free_steps
    flops = bench.count_flops(imdb.spec, 32, 50, 25)["total"]
    assert 3.6e12 < flops < 3.8e12  # ~3.7 TFLOP per training batch at the paper's IMDB shape


@pytest.mark.parametrize("precision, companion", [("bf16", torch.bfloat16), ("int8", torch.float32)])
def test_symmetric_contrast_reads_the_difference_form(monkeypatch: pytest.MonkeyPatch, precision: str,
                                                      companion: torch.dtype):
    """The contrast read from the difference form is the exact formula on the same nudged states, and leaves them
    as they were. int8 with fp32 projection states is what a CPU without bf16 instructions runs: there the
    projection's δ± have the parameters' dtype, so an in-place step on a `.to(dtype)` of them would edit δ⁺ itself
    (it did: the first synapse's contrast then read δ⁺ − δ⁻ for δ⁺, 9° off float64 on a trained SNLI network)."""
    from analog_ep.dynamics import relax
    from analog_ep.fast import lowp_weights

    if precision == "int8" and not int8_available():
        pytest.skip("no int8 kernel set works here")
    monkeypatch.setattr(lowp_weights, "lowp_dtype", lambda device="cpu": companion)
    net = small_net()
    x, y = random_inputs(net.spec, 6, dtype=torch.float32)
    inputs = net.prepare(x, precision)
    assert inputs.lowp.dtype == companion
    free, _ = free_phase(net, inputs, 30)
    inputs2, start = net.nudge_start(inputs, free, times=2)
    betas = torch.cat([torch.full((6, 1), 0.1), torch.full((6, 1), -0.1)])
    target = torch.nn.functional.one_hot(y, 2).float().repeat(2, 1)
    nudged, _ = relax(net, inputs2, start, 10, beta=betas, target=target)
    kept = [s.clone() for s in nudged]
    fast = net.symmetric_contrast(inputs2, nudged, -0.5)
    assert all(torch.equal(a, b) for a, b in zip(nudged, kept))
    # the oracle: the same nudged states in full, s* + δ, in float64 (in fp32, s* would cancel out of s⁺ − s⁻ less
    # precisely than the fast path's δ± do)
    s_star = inputs2.lowp.base.states[0].double().repeat(2, 1, 1, 1)
    full = [s_star + nudged[0].double(), *(s.double() for s in nudged[1:])]
    assert all(torch.allclose(a, b.double(), atol=1e-5) for a, b in zip(full, net.full_state(inputs2, nudged)))
    coef = torch.cat([torch.full((6,), -0.5), torch.full((6,), 0.5)]).double()
    net64 = copy.deepcopy(net).double()
    exact = net64.phi_param_grads(net64.prepare(x.double()).repeat(2), full, coef)
    assert list(fast) == [name for name, _ in net.named_parameters()]
    bound = 1.0 if companion == torch.bfloat16 else 0.01  # bf16 operands round the contrast's product; fp32 do not
    for name in exact:
        assert angle_deg(fast[name].double(), exact[name]) < bound, name
    # the exact path: the same numbers as phi_param_grads with signed coefficients
    e_inputs2, e_start = net.nudge_start(net.prepare(x), [s.float() for s in free], times=2)
    e_nudged, _ = relax(net, e_inputs2, e_start, 10, beta=betas, target=target)
    plain = net.phi_param_grads(e_inputs2, e_nudged, coef)
    for name, g in net.symmetric_contrast(e_inputs2, e_nudged, -0.5).items():
        assert torch.equal(g, plain[name])


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_gdu_check_passes_on_the_fast_path(precision):
    """EP-vs-BPTT agreement (the GDU check) is as good with the fast path as with the exact path."""
    from analog_ep.gdu import gdu_report

    if precision == "int8" and not int8_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    net = small_net(schedule="synchronous").double()
    x, y = random_inputs(net.spec, 8)
    exact = gdu_report(net, x, y, EPConfig(0.01, 40, 15))
    fast = gdu_report(net, x, y, EPConfig(0.01, 40, 15, precision=precision))
    for estimator in ("ep_symmetric", "ep_two_phase"):  # two-phase EP needs s* to be a fixed point of the
        assert fast[estimator]["angle_deg"] < exact[estimator]["angle_deg"] + 1.0  # nudged dynamics: no drift


def test_fast_nudged_dynamics_start_at_a_fixed_point():
    """β = 0 from the free fixed point: the difference form must not move (bf16 rows of A* do not sum to 1)."""
    from analog_ep.dynamics import relax

    net = small_net(schedule="synchronous")
    x, _ = random_inputs(net.spec, 8, dtype=torch.float32)
    inputs = net.prepare(x, "bf16")
    free, trace = free_phase(net, inputs, 40)
    assert trace.refined_at is not None and trace.final_residual < 1e-5
    nudge_inputs, start = net.nudge_start(inputs, free)
    after, _ = relax(net, nudge_inputs, start, 10)
    for a, b in zip(net.full_state(nudge_inputs, after), free):
        assert float((a.float() - b.float()).abs().max()) < 1e-5


def test_symmetric_ep_ends_its_free_phase_in_the_difference_form_for_the_last_steps():
    """The nudged phases start from a fixed point of the dynamics they run: symmetric EP's free phase takes the
    difference form for its last REFINE_LAST steps (from the stall on only where early exit needs the sharper
    residual, or the bf16 residual never gets below the tolerance)."""
    from analog_ep.dynamics import REFINE_LAST

    net = small_net(schedule="synchronous")
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    plain = ep_symmetric(net, x, y, EPConfig(0.1, 40, 15, precision="bf16"), set_grad=False)
    assert plain.free_trace.refined_at == 40 - REFINE_LAST and plain.free_trace.steps == 40
    early = ep_symmetric(net, x, y, EPConfig(0.1, 40, 15, precision="bf16", tol=1e-5), set_grad=False)
    assert early.free_trace.refined_at < 40 - REFINE_LAST and early.free_trace.final_residual < 1e-5
    assert angle_deg(flat(plain.grads), flat(early.grads)) < 1.0


def test_bf16_products_in_row_blocks_equal_one_product():
    """Row blocks change how many rows go into each product, not what a row's result is: every row is the
    same dot products of the same bf16 operands, so the result is the one product's, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 300, generator=gen)
    x = torch.randn(2 * UP_MAX_ROWS + 5, 300, generator=gen)  # three row blocks
    blocked = Bf16Weight(w).up(x)
    whole = torch.mm(x.to(torch.bfloat16), w.to(torch.bfloat16).t())
    assert blocked.dtype == torch.bfloat16 and blocked.shape == whole.shape
    assert torch.equal(blocked, whole)


def test_keep_freed_memory_really_keeps_it():
    """A freed 64 MB malloc block is reused without faulting its pages in again (mallopt's value is a C int:
    a trim threshold of 2**62 was silently truncated to 0, i.e. trim on every free). glibc's own malloc is
    measured: torch's allocations of some sizes still fault (docs/history.md)."""
    code = (
        "import ctypes, ctypes.util, resource\n"
        "from analog_ep.fast.allocator import keep_freed_memory\n"
        "assert keep_freed_memory()\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "libc.malloc.restype = ctypes.c_void_p\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "def touch():\n"
        "    p = libc.malloc(64_000_000)\n"
        "    ctypes.memset(p, 1, 64_000_000)\n"
        "    libc.free(p)\n"
        "touch()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "touch()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 1000  # 64 MB faulted in afresh would be ~16,000 pages


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_inference_can_reuse_low_precision_weights_built_once(precision):
    if precision == "int8" and not int8_available():
        pytest.skip("this torch build has no oneDNN int8 linear")
    net = small_net()
    x, _ = random_inputs(net.spec, 6, dtype=torch.float32)
    weights = net.low_precision_weights(precision)
    first = predict(net, x, 20, precision=precision, weights=weights)
    assert torch.equal(predict(net, x[:3], 20, precision=precision, weights=weights), first[:3])
    assert torch.equal(predict(net, x, 20, precision=precision), first)  # rebuilt: the same numbers


def test_a_net_that_ran_the_fast_path_can_be_copied_and_pickled():
    """The per-batch low-precision caches stay behind (int8 ones hold opaque oneDNN tensors)."""
    import copy
    import pickle

    net = small_net()
    x, y = random_inputs(net.spec, 4, dtype=torch.float32)
    precision = "int8" if int8_available() else "bf16"
    ep_symmetric(net, x, y, EPConfig(0.1, 10, 5, precision=precision), set_grad=False)
    assert net._lowp_cache is not None
    clone = copy.deepcopy(net)
    assert getattr(clone, "_lowp_cache", None) is None
    for a, b in zip(clone.parameters(), net.parameters()):
        assert torch.equal(a, b)
    again = pickle.loads(pickle.dumps(net))
    assert torch.equal(predict(again, x, 10, precision=precision), predict(net, x, 10, precision=precision))


@pytest.mark.realdata
def test_real_bench_inputs_are_an_embedded_training_batch_whose_words_repeat():
    from analog_ep.fast.retrieval import kept_fraction

    shape = bench.build_shape("snli-cpu")
    assert bench.resolve_inputs("auto", "snli-cpu") == "real" and bench.resolve_inputs("auto", "snli-tiny") == "random"
    x, y = bench.real_batch(shape, 8)
    assert x.shape == (8, shape.spec.num_streams, shape.spec.seq_len, shape.spec.dim) and y.shape == (8,)
    inputs = EPNet(shape.spec, seed=0).prepare(x)
    assert kept_fraction(inputs.keys, inputs.key_mask) < 1.0  # padding and repeated words: fewer distinct keys
    with pytest.raises(ConfigError, match="test shape"):
        bench.real_batch(bench.build_shape("snli-tiny"), 8)
    with pytest.raises(ConfigError, match="--inputs random"):
        bench.resolve_inputs("real", "snli-tiny")


def test_train_step_releases_the_spent_gradients():
    """A caller holding the last estimate must not keep its gradients alive into the next batch: the fast path's
    FC-1 gradient buffer is then reused, not doubled (peak memory at the paper's SNLI shape)."""
    from analog_ep.train.inner_loop import train_step

    net = small_net("snli")
    x, y = random_inputs(net.spec, 8, dtype=torch.float32)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    estimator = make_estimator("ep_symmetric", EPConfig(0.5, 10, 5, precision="bf16"))
    kept = [train_step(net, estimator, x, y, optimizer) for _ in range(3)]  # every estimate held on purpose
    assert all(est.grads == {} for est in kept)
    assert all(p.grad is None for p in net.parameters())
    assert len(net._scratch_pool["weights.0"]) == 1
