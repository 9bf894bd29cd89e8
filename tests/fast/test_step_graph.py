"""Relaxation steps on static buffers (`fast.step_graph`): the loop that CUDA graphs replay gives the plain loop's
numbers, bit for bit, in every branch of `relax` (early exit, tracked residuals read at the end, the fast path's
refinement, ±β phases); capture itself is checked where a CUDA device is present."""

from __future__ import annotations

import warnings

import pytest
import torch

from analog_ep import dynamics
from analog_ep.dynamics import relax
from analog_ep.errors import NumericalError
from analog_ep.estimators import EPConfig, ep_symmetric, ep_two_phase
from analog_ep.fast import step_graph
from tests.helpers import random_inputs, small_net, tiny_net


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("tol, track", [(None, True), (1e-6, True), (None, False)])
def test_static_buffers_relax_as_the_plain_loop_on_the_exact_path(tol, track):
    net = tiny_net("imdb")
    x, y = random_inputs(net.spec, 5)
    inputs = net.prepare(x)
    runs = {mode: relax(net, inputs, net.zero_state(5), 40, tol=tol, track=track, graph=mode)
            for mode in ("off", "static")}
    (plain, t_plain), (static, t_static) = runs["off"], runs["static"]
    assert _same(plain, static)
    assert t_plain.residuals == t_static.residuals and t_plain.steps == t_static.steps
    if tol is not None:
        assert t_static.steps < 40  # it did stop early, on the residual read at each step
    # the nudged phases: ±β as a (2B, 1) tensor, a target, no residuals
    target = torch.nn.functional.one_hot(y, 2).double().repeat(2, 1)
    betas = torch.cat([torch.full((5, 1), 0.2), torch.full((5, 1), -0.2)]).double()
    nudge_inputs, start = net.nudge_start(inputs, plain, times=2)
    nudged = [relax(net, nudge_inputs, start, 15, beta=betas, target=target, track=False, graph=mode)[0]
              for mode in ("off", "static")]
    assert _same(*nudged)


@pytest.mark.parametrize("refine", [True, "last"])
def test_static_buffers_keep_the_fast_paths_refinement(refine):
    """The bf16 path switches to the difference form mid-relaxation (a new step function: a new graph)."""
    net = small_net()
    x, _ = random_inputs(net.spec, 4, dtype=torch.float32)
    results = [relax(net, net.prepare(x, "bf16"), net.zero_state(4), 40, residual="fc", refine=refine, graph=mode)
               for mode in ("off", "static")]
    (plain, t_plain), (static, t_static) = results
    assert t_plain.refined_at is not None and t_plain.refined_at == t_static.refined_at
    assert t_plain.residuals == t_static.residuals
    assert _same(plain, static)


@pytest.mark.parametrize("estimator", [ep_symmetric, ep_two_phase])
def test_estimators_give_the_same_update_on_static_buffers(monkeypatch: pytest.MonkeyPatch, estimator):
    net = small_net()
    x, y = random_inputs(net.spec, 4, dtype=torch.float32)
    cfg = EPConfig(0.1, 30, 10, precision="bf16")
    plain = estimator(net, x, y, cfg, set_grad=False)
    monkeypatch.setattr(dynamics, "default_mode", lambda state: "static")
    static = estimator(net, x, y, cfg, set_grad=False)
    assert plain.free_trace.residuals == static.free_trace.residuals
    assert all(torch.equal(plain.grads[k], static.grads[k]) for k in plain.grads)


def test_divergence_is_still_reported_when_residuals_are_read_at_the_end():
    net = tiny_net("imdb")
    with torch.no_grad():
        net.weights[1][0, 0] = float("nan")
    x, _ = random_inputs(net.spec, 3)
    for mode in ("off", "static"):  # the same step: the first whose residual is not finite
        with pytest.raises(NumericalError, match="free phase diverged: layer .* at step 1; .* weights.1"):
            relax(net, net.prepare(x), net.zero_state(3), 20, graph=mode)


def test_graph_modes_are_checked():
    net = tiny_net("imdb")
    x, _ = random_inputs(net.spec, 2)
    with pytest.raises(ValueError, match="graph must be one of"):
        relax(net, net.prepare(x), net.zero_state(2), 5, graph="cuda")
    with pytest.raises(ValueError, match="mode must be"):
        step_graph.GraphedStep(lambda s: s, net.zero_state(2), mode="off")
    assert step_graph.default_mode(net.zero_state(2)) == "off"  # a CPU state never captures


class _FakeCuda:
    """torch.cuda's stream and graph calls as `GraphedStep._capture` makes them, on the CPU: streams do nothing, a
    capture records the body without its effects (as a real capture, which launches nothing) and a replay runs it;
    `fail` makes the capture raise, as an operation that synchronises with the host does."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        import contextlib
        import inspect

        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                self.owner._body()

        @contextlib.contextmanager
        def graph(g):
            owner = inspect.currentframe().f_back.f_back.f_locals["self"]  # the GraphedStep capturing
            if fail:
                raise RuntimeError("operation not permitted when stream is capturing")
            kept = [t.clone() for t in (*owner.state, owner.residual)]
            yield
            for t, k in zip((*owner.state, owner.residual), kept):  # a capture launches nothing: undo the body
                t.copy_(k)
            g.owner = owner
            fake.captures += 1

        self.captures = 0
        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
        monkeypatch.setattr(step_graph, "_warned", False)


@pytest.mark.parametrize("fail", [False, True])
def test_the_capture_sequence_gives_the_plain_loops_numbers(monkeypatch: pytest.MonkeyPatch, fail: bool):
    """Capture mode's order of events (the first step eagerly on a side stream, the body captured, replays after;
    or, where the capture fails, one warning and the eager body), emulated on the CPU: the plain loop's states,
    residuals and refinement, bit for bit."""
    net = small_net()
    x, _ = random_inputs(net.spec, 4, dtype=torch.float32)
    plain, t_plain = relax(net, net.prepare(x, "bf16"), net.zero_state(4), 30, residual="fc", refine="last",
                           graph="off")
    fake = _FakeCuda(monkeypatch, fail)
    if fail:
        with pytest.warns(RuntimeWarning, match="capture of the relaxation step failed"):
            graphed, t_graphed = relax(net, net.prepare(x, "bf16"), net.zero_state(4), 30, residual="fc",
                                       refine="last", graph="capture")
    else:
        graphed, t_graphed = relax(net, net.prepare(x, "bf16"), net.zero_state(4), 30, residual="fc",
                                   refine="last", graph="capture")
    assert fake.captures == (0 if fail else 2)  # the free phase, then its difference-form ending
    assert t_graphed.refined_at == t_plain.refined_at and t_graphed.residuals == t_plain.residuals
    assert _same(plain, graphed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_captured_graphs_give_the_plain_loops_update_on_cuda(monkeypatch: pytest.MonkeyPatch, precision):
    net = small_net().cuda()
    x, y = (t.cuda() for t in random_inputs(net.spec, 4, dtype=torch.float32))
    cfg = EPConfig(0.1, 30, 10, precision=precision)
    plain, again = (ep_symmetric(net, x, y, cfg, set_grad=False) for _ in range(2))
    monkeypatch.setattr(step_graph, "ENABLED", True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: fail the test instead
        graphed = ep_symmetric(net, x, y, cfg, set_grad=False)
    if all(torch.equal(plain.grads[k], again.grads[k]) for k in plain.grads):  # the plain loop repeats itself:
        assert plain.free_trace.residuals == graphed.free_trace.residuals  # the graphs give its numbers exactly
        assert all(torch.equal(plain.grads[k], graphed.grads[k]) for k in plain.grads)
    else:  # kernels with atomics: graphed within the plain loop's own spread (an angle of 1e-3° is 2e-5 relative)
        flat = [torch.cat([e.grads[k].flatten() for k in sorted(e.grads)]).double() for e in (plain, again, graphed)]
        spread = float((flat[0] - flat[1]).norm())
        assert float((flat[0] - flat[2]).norm()) <= 10 * spread + 1e-6 * float(flat[0].norm())

