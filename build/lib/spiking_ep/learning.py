"""Learning from spikes: symmetric EP and continual EP whose weight updates are read off synaptic traces.

Every update is `EPNet.phi_param_grads` (∂Φ/∂θ: ∂Φ/∂W_n = h^{n+1} a^{nᵀ}, ∂Φ/∂b_n = h^{n+1},
∂Φ/∂W₀ = Σ_t s_t x_tᵀ) evaluated on what the two ends of a synapse hold locally: traces of spikes.

Spike-driven symmetric EP. After a spiking free phase of T steps the network runs two nudged phases
(+β and −β) of K steps, from the same neuron state (deterministic units start identical: the two
phases differ only through the nudge). Each synapse accumulates, over the last W steps of the nudged
phases, the product of its pre- and postsynaptic activity:

    ΔW_ij ∝ −ĝ_ij = (1/2β) (1/W) Σ_{k ∈ window} [ post_i⁺(k) pre_j⁺(k) − post_i⁻(k) pre_j⁻(k) ]

with (rule "trace") post, pre = the traces r (one multiply-accumulate per synapse and step), or (rule
"spike", STDP-like and event-driven) ½[s_i(k) r_j(k−1) + r_i(k−1) s_j(k)]: a synapse is touched only
when one of its two neurons spikes, and reads the other's trace. Both rules have the analog EP estimate
as their limit: r → s^{±β}, E[s] = r.

Spike-driven C-EP (Ernoult et al. 2020 with traces for states): one nudged phase (+β), and at every
step k each synapse moves at once by

    ΔW_ij = (η/β) [ (r_i^{k+1} − r_i^k) r_j^{k+1} + r_i^k (r_j^{k+1} − r_j^k) ]
          = (η/β) [ r_i^{k+1} r_j^{k+1} − r_i^k r_j^k ]

(the change of the postsynaptic trace times the presynaptic trace, plus the symmetric term): local in
space and time, no stored free state. With η → 0 the sum telescopes to two-phase EP on traces, read at
two instants only (end of the free phase, end of the nudged phase), so the traces' ripple does not
average out: the rule reads a slower *plasticity trace* m ← m + (r − m)/τ_p of each synaptic trace
(`plasticity_tau`, default K/4), still one local state variable per neuron.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from analog_ep.estimators import signed_coef, write_grads
from analog_ep.phi import EPNet, Inputs, mse_loss, one_hot_target
from spiking_ep.convert import SpikingNet
from spiking_ep.dynamics import SpikeRecord, SpikingState, new_record, run_phase, spiking_free_phase, stack_spiking

HEBBIAN_RULES = ("trace", "spike")


@dataclass(frozen=True)
class SpikingEPConfig:
    """Phase lengths in timesteps. `window`: nudged steps the Hebbian products are accumulated over
    (default: the second half of the nudged phase, once the traces have left the free state)."""

    beta: float = 0.1
    free_steps: int = 128
    nudge_steps: int = 64
    window: int | None = None
    hebbian: str = "trace"
    plasticity_tau: float | None = None  # C-EP: slower trace m ← m + (r − m)/τ_p (None: nudge_steps/4; 1: m = r)

    def __post_init__(self) -> None:
        if self.beta <= 0 or self.free_steps < 1 or self.nudge_steps < 1:
            raise ValueError("need beta > 0, free_steps ≥ 1 and nudge_steps ≥ 1")
        if self.hebbian not in HEBBIAN_RULES:
            raise ValueError(f"hebbian must be one of {HEBBIAN_RULES}, got {self.hebbian!r}")
        if not 1 <= self.accumulate_steps <= self.nudge_steps:
            raise ValueError(f"window must be in 1..nudge_steps, got {self.window}")

    @property
    def plasticity_time_constant(self) -> float:
        return self.plasticity_tau if self.plasticity_tau is not None else max(self.nudge_steps / 4, 1.0)

    @property
    def accumulate_steps(self) -> int:
        return self.window if self.window is not None else max(self.nudge_steps // 2, 1)


@dataclass
class SpikingEstimate:
    grads: dict[str, torch.Tensor]  # descent direction per parameter name (as analog_ep's estimators)
    output: torch.Tensor  # free-phase output trace (B, C)
    loss: float  # MSE of the free-phase output trace
    record: SpikeRecord  # spikes of the free and nudged phases (for the energy of learning)
    applied: bool = False  # True for C-EP: the weights already moved
    synapse_updates: dict[str, float] = field(default_factory=dict)  # per phase: plasticity events / sample


class HebbianAccumulator:
    """`on_step` hook: Σ_k coef_b · ∂Φ/∂θ(pre/post activity at step k), over steps after `start`."""

    def __init__(self, net: EPNet, inputs: Inputs, coef: torch.Tensor, start: int, rule: str) -> None:
        self.net, self.inputs, self.coef, self.start, self.rule = net, inputs, coef, start, rule
        self.grads: dict[str, torch.Tensor] | None = None
        self.spikes = 0.0

    def __call__(self, old: SpikingState, new: SpikingState, spikes: list[torch.Tensor]) -> None:
        if new.t <= self.start:
            return
        if self.rule == "trace":
            inc = self.net.phi_param_grads(self.inputs, new.traces, self.coef)
        else:  # spike × the partner's trace, both ways: even layers' spikes with odd layers' traces and back
            a = [s if n % 2 == 0 else r for n, (s, r) in enumerate(zip(spikes, old.traces))]
            b = [r if n % 2 == 0 else s for n, (s, r) in enumerate(zip(spikes, old.traces))]
            inc = self.net.phi_param_grads(self.inputs, a, self.coef / 2)
            for name, g in self.net.phi_param_grads(self.inputs, b, self.coef / 2).items():
                inc[name] += g
        self.spikes += sum(float(s.abs().sum()) for s in spikes)
        if self.grads is None:
            self.grads = inc
        else:
            for name, g in inc.items():
                self.grads[name] += g


def _check_rule(snet: SpikingNet, rule: str) -> None:
    if rule == "spike" and (snet.coding.signed or snet.attention.mode == "dense"):
        raise ValueError("the 'spike' Hebbian rule needs unsigned rate-coded units and a spiking attention layer; "
                         "use hebbian='trace' with sigma-delta coding or dense attention")


@torch.no_grad()
def spiking_ep_symmetric(snet: SpikingNet, x: torch.Tensor, labels: torch.Tensor, cfg: SpikingEPConfig,
                         set_grad: bool = True) -> SpikingEstimate:
    """Spike-driven symmetric EP: the gradient of the batch-mean MSE, to be descended (as `ep_symmetric`)."""
    _check_rule(snet, cfg.hebbian)
    net = snet.net
    inputs = net.prepare(x)
    B = inputs.batch_size
    target = one_hot_target(labels, net.spec.num_classes, net.weights[0].dtype)
    record = new_record(snet, B)
    free = spiking_free_phase(snet, inputs, cfg.free_steps, record=record)
    both = stack_spiking(free, free.clone())  # rows 0..B-1: +β, rows B..2B-1: −β
    inputs2 = inputs.repeat(2)
    betas = signed_coef(B, cfg.beta, free.traces[-1]).view(-1, 1)
    W = cfg.accumulate_steps
    coef = signed_coef(B, -1.0 / (2 * cfg.beta * B * W), free.traces[-1])
    acc = HebbianAccumulator(net, inputs2, coef, free.t + cfg.nudge_steps - W, cfg.hebbian)
    run_phase(snet, inputs2, both, cfg.nudge_steps, beta=betas, target=target.repeat(2, 1), record=record,
              phase="nudge", on_step=acc)
    grads = acc.grads
    if set_grad:  # a learned word-vector table gets none: the spiking network reads the vectors as inputs
        write_grads(net, grads)
    updates = _synapse_updates(snet, record, cfg.hebbian, W, acc.spikes / B)
    return SpikingEstimate(grads, free.traces[-1], float(mse_loss(free.traces[-1], target)), record,
                           synapse_updates=updates)


def synapse_count(net: EPNet) -> int:
    """Weights and biases: the synapses plasticity updates (a learned word-vector table is an input memory)."""
    return sum(p.numel() for name, p in net.named_parameters() if name != "embedding")


def _synapse_updates(snet: SpikingNet, record: SpikeRecord, rule: str, window: int, spikes_per_sample: float) -> dict:
    """Plasticity events per sample: every synapse every accumulated step ("trace"), or one per spike and
    synapse it touches ("spike": fan-out counted in both directions, as pair-based STDP hardware does)."""
    synapses = synapse_count(snet.net)
    if rule == "trace":
        return {"nudge": float(2 * window * synapses)}
    mean_fan = sum(record.fan_out) / max(len(record.fan_out), 1)
    return {"nudge": float(spikes_per_sample * mean_fan)}


class _SlowTraces:
    """Plasticity traces m ← m + (r − m)/τ_p of the synaptic traces r (τ_p ≤ 1: m = r). C-EP's increments
    telescope, so its total reads the traces at two instants only: a slower trace lowers that noise."""

    def __init__(self, tau: float) -> None:
        self.tau = None if tau <= 1 else tau
        self.m: list[torch.Tensor] | None = None

    def __call__(self, old: SpikingState, new: SpikingState, spikes: list[torch.Tensor]) -> None:
        if self.tau is None:
            return
        if self.m is None:
            self.m = [r.clone() for r in new.traces]
        else:
            a = max(1.0 / new.t, 1.0 / self.tau)
            for m, r in zip(self.m, new.traces):
                m.add_(r - m, alpha=a)

    def values(self, state: SpikingState) -> list[torch.Tensor]:
        return state.traces if self.m is None else [m.clone() for m in self.m]


@torch.no_grad()
def spiking_cep(snet: SpikingNet, x: torch.Tensor, labels: torch.Tensor, cfg: SpikingEPConfig,
                lrs: dict[str, float] | float) -> SpikingEstimate:
    """Spike-driven C-EP: weights move at every nudged step from consecutive traces (no stored free state).

    `lrs` is η per parameter name or one float. Returns the equivalent descent direction −Δθ/η summed
    over the phase (for comparisons); the weights of `snet.net` have already moved.
    """
    net = snet.net
    inputs = net.prepare(x)
    B = inputs.batch_size
    target = one_hot_target(labels, net.spec.num_classes, net.weights[0].dtype)
    record = new_record(snet, B)
    slow = _SlowTraces(cfg.plasticity_time_constant)
    state = spiking_free_phase(snet, inputs, cfg.free_steps, record=record, on_step=slow)
    free_output = state.traces[-1]
    params = dict(net.named_parameters())
    etas = {n: (lrs if isinstance(lrs, float) else lrs[n]) for n in params}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    coef = signed_coef(B, 1.0 / (cfg.beta * B), free_output)  # (new, old) stacked: ascent on Φ difference
    inputs2 = inputs.repeat(2)
    for _ in range(cfg.nudge_steps):
        before = slow.values(state)
        new = run_phase(snet, inputs, state, 1, beta=cfg.beta, target=target, record=record, phase="nudge",
                        on_step=slow)
        after = slow.values(new)
        increments = net.phi_param_grads(inputs2, [torch.cat([a, b]) for a, b in zip(after, before)], coef)
        for name, inc in increments.items():
            params[name].add_(inc, alpha=etas[name])
            total[name].add_(inc)
        if net.proj_weight is not None:  # the projection synapse moved: its input current changes
            inputs = net.prepare(x)
            inputs2 = inputs.repeat(2)
        state = new
    for p in params.values():
        p.grad = None
    synapses = synapse_count(net)
    return SpikingEstimate({n: -t for n, t in total.items()}, free_output, float(mse_loss(free_output, target)),
                           record, applied=True, synapse_updates={"nudge": float(cfg.nudge_steps * synapses)})


def spiking_cep_on_copy(snet: SpikingNet, x: torch.Tensor, labels: torch.Tensor, cfg: SpikingEPConfig,
                        lr: float) -> SpikingEstimate:
    """C-EP's descent direction without touching `snet.net` (for comparisons)."""
    twin = copy.copy(snet)
    twin.net = copy.deepcopy(snet.net)
    return spiking_cep(twin, x, labels, cfg, lr)


def angle_degrees(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str] | None = None) -> float:
    """Angle between two gradient dicts, flattened and concatenated (whole model, or the given names)."""
    names = names or sorted(a)
    u = torch.cat([a[n].flatten().double() for n in names])
    v = torch.cat([b[n].flatten().double() for n in names])
    cos = torch.dot(u, v) / (u.norm() * v.norm()).clamp_min(1e-300)
    return float(torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0))))


def per_layer_angles(net: EPNet, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """Angle per layer (all the parameters that feed it), in `net.spec.layer_names` order."""
    layer_of = net.param_layer
    return {layer: angle_degrees(a, b, [n for n in a if layer_of[n] == layer]) for layer in net.spec.layer_names}
