"""NIR export of a frozen spiking network: every part NIR's primitives can express, each other part named.

The graph (`nir_graph`) of a network with a projection (Hopfield attention) layer:

    tokens ─Conv2d 1×1 (W₀ per token)→ token_query          ─┐ ports to the host, which computes the
    fc1 ─Affine(W₁ᵀ, b = pooled queries Q) or Linear(W₁ᵀ)→ query ─┘ retrieval s¹ = softmax(γ q Kᵀ) K
    input = flat(s¹) ─Affine(W₁/2, b₁/2)→ fc1 ─Affine(W₂/2, b₂/2)→ fc2 ─ … → out → output
                                          ▲ ←──── Linear(W₂ᵀ/2) ──── │   (every symmetric synapse: W and Wᵀ)

Units are `nir.IF` (v ← v + I, spike when v > 1, reset to v_reset = 0); the synaptic current of a unit is
Φ's drive with *spikes* for states, halved: I = ½(W a + b + Wᵀ h) (σ(u) = u/2 in its linear range; the ½ is
folded into the weights: norse ignores IF's `r`). No time constants: one NIR step is one of our timesteps
whatever dt a simulator is given. Timing: each layer reads this step's spikes from below and the previous
step's from above (the recurrent edges). Nodes are built bottom-up, but `nir.read` returns them alphabetically
(HDF5): a consumer that schedules by node order gets them back in order from `nir_consumers.in_schedule_order`.

The projection layer's query current ∂Φ/∂s¹ = X W₀ᵀ (or the learned queries Q) + W₁ᵀh¹ is linear and is
exported, as ports: `query` (the top-down part, with Q as its bias when pooling) and, without pooling,
`token_query` (a 1×1 convolution over the token positions, the same d×d map W₀ at every token). The
retrieval itself is not expressible (`not_expressible`, per node, with the reason); the host computes it
and feeds flat(s¹) into `input`. Simulators that take one input and one output (nirtorch, so norse and
snntorch) run `subgraph(graph, "input", "output")`, the spiking part; the ports are checked by running
`subgraph(graph, "fc1", "query")` and `subgraph(graph, "tokens", "token_query")` through them.

snntorch 1.0 imports `nir.IF` as `snn.Leaky(beta=0.9)` (a leaky neuron) that returns a (spikes, membrane)
tuple where the graph expects spikes; its `nir.LIF` import is exact in the no-leak limit. `lif_limit`
rewrites a graph's IF units into that limit (`NEURON_ENCODINGS`, `seqep export-nir --neuron lif`).
The consumers and the round trip are in `spiking_ep.nir_consumers`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analog_ep.dynamics import free_phase
from analog_ep.phi import EPNet, Inputs

# Parts of every exported network that NIR cannot express, and how the export handles them.
NOT_EXPRESSIBLE = {
    "plasticity": "NIR graphs are frozen: EP / C-EP learning stays in spiking_ep.learning",
    "sigma_delta_and_traces": "signed graded (sigma-delta) spikes and synaptic trace filters are not exported: "
                              "IF units read the spikes of their neighbours directly",
    "hard_sigmoid_clamp": "no clamp primitive: IF units integrate u/2 unclamped (steady rates still saturate in "
                          "[0, 1])",
    "reset_by_subtraction": "NIR IF resets to v_reset = 0 (the overshoot is lost); our IF units subtract",
}
# Nodes of the projection (Hopfield attention) layer that NIR cannot express, each with the exact reason.
ATTENTION_NOT_EXPRESSIBLE = {
    "proj.scores": "γ q Kᵀ multiplies two signals, the query (it moves with fc1's spikes) and the keys (this "
                   "sample's tokens, not fixed weights): NIR edges are fixed-weight linear maps and no NIR node "
                   "multiplies two signals",
    "proj.softmax": "softmax over the keys (exponential, division by the row sum, padding masked out): NIR has no "
                    "exponential, division or normalisation primitive",
    "proj.winner_take_all": "the spiking retrieval's winner-take-all (per-key credit, one winner per row and step "
                            "= argmax over the row's pointer units): NIR has no population argmax or lateral "
                            "inhibition rule; its IF/LIF units threshold independently",
    "proj.event_trigger": "event-driven attention's trigger (the L1 drift of fc1's trace since the last recompute, "
                          "compared with δ, rows held in between): NIR has no absolute value, norm or "
                          "sample-and-hold primitive",
    "proj.retrieval": "Σ_j p_j K_j multiplies the attention weights by the keys (this sample's tokens): not "
                      "expressible for the same reason as the scores; the host computes s¹ from the query "
                      "ports and feeds flat(s¹) into 'input'",
}
SEMANTICS = ("IF units: v ← v + I; spike when v > 1; reset to 0. I = Affine(W/2, b/2)(spikes below, this step) + "
             "Linear(Wᵀ/2)(spikes above, previous step). No time constants: one NIR step = one timestep for any dt. "
             "Readout: argmax of output spike counts over the second half of the run.")
NEURON_ENCODINGS = ("if", "lif")
# `lif_limit`: τ = 2³⁰ dt and inputs scaled by 2³⁰, so v ← v + I exactly up to a leak of 2⁻³⁰ v per step.
LIF_DT = 1e-4  # s: the step snntorch 1.0's NIR import assumes for nir.LIF; norse must be run with this dt
LIF_GAIN = 2.0 ** 30  # a power of two: scaling the weights by it is exact in float


def _fc_names(net: EPNet) -> list[str]:
    first_fc = 1 if net.spec.num_projections else 0  # all projections share the one "proj" layer
    return net.spec.layer_names[first_fc:]


def _if_units(size: int, name: str) -> Any:
    import nir

    return nir.IF(r=np.ones(size, np.float32), v_threshold=np.ones(size, np.float32),
                  v_reset=np.zeros(size, np.float32), metadata={"layer": name})


def nir_graph(net: EPNet, metadata: dict[str, Any] | None = None, neuron: str = "if") -> Any:
    """`net` as a NIR graph (float32): the spiking FC part, the projection layer's query ports, and metadata
    naming every part that is not expressible. `neuron` "lif": the IF units in their no-leak LIF form."""
    import nir

    if neuron not in NEURON_ENCODINGS:
        raise ValueError(f"neuron must be one of {NEURON_ENCODINGS}, got {neuron!r}")
    spec = net.spec
    names = _fc_names(net)
    weights = [w.detach().cpu().float().numpy() for w in net.weights]
    biases = [b.detach().cpu().float().numpy() for b in net.biases]
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array([spec.fc_input_size])})}
    edges: list[tuple[str, str]] = []
    below = "input"
    for k, name in enumerate(names):  # bottom-up: see the module docstring on the order
        size = spec.layers[k]
        nodes[f"w_{name}"] = nir.Affine(weight=weights[k] / 2, bias=biases[k] / 2,
                                        metadata={"synapse": f"{below} → {name} (bottom-up, W/2 and b/2)"})
        nodes[name] = _if_units(size, name)
        edges += [(below, f"w_{name}"), (f"w_{name}", name)]
        if k > 0:  # the same synapse read top-down: Wᵀ into the layer below
            nodes[f"wT_{name}"] = nir.Linear(weight=np.ascontiguousarray(weights[k].T / 2),
                                             metadata={"synapse": f"{name} → {below} (top-down, Wᵀ/2)"})
            edges += [(name, f"wT_{name}"), (f"wT_{name}", below)]
        below = name
    nodes["output"] = nir.Output(output_type={"output": np.array([spec.layers[-1]])})
    edges.append((names[-1], "output"))
    if spec.num_projections:
        _add_query_ports(net, nodes, edges, weights[0])
    not_expressible = {**_projection_not_expressible(spec), **NOT_EXPRESSIBLE}
    meta = {"producer": "seqep spiking_ep.nir_export", "network": spec.name, "layers": json.dumps(names),
            "spec": json.dumps(spec.to_dict()), "semantics": SEMANTICS, "input": _input_text(net),
            "neuron": "if", **_port_text(net),
            **{f"not_expressible.{k}": v for k, v in not_expressible.items()}, **(metadata or {})}
    graph = nir.NIRGraph(nodes=nodes, edges=edges, metadata={k: str(v) for k, v in meta.items()})
    return lif_limit(graph) if neuron == "lif" else graph


def _projection_not_expressible(spec: Any) -> dict[str, str]:
    if not spec.num_projections:
        return {}
    if spec.attention:
        return ATTENTION_NOT_EXPRESSIBLE
    return {"proj.units": "without attention the projection layer is σ(query) per unit; this export leaves its "
                          "units to the host (it reads the query ports and feeds flat(s¹) into 'input')"}


def _add_query_ports(net: EPNet, nodes: dict[str, Any], edges: list[tuple[str, str]], w1: np.ndarray) -> None:
    """The projection layer's query current ∂Φ/∂s¹ (unhalved: the retrieval reads it as is), as ports."""
    import nir

    spec = net.spec
    P, L, d = spec.num_projections, spec.proj_len, spec.dim
    top_down = np.ascontiguousarray(w1.T)  # (P·L·d, n₁): W₁ᵀh¹ in s¹'s layout
    note = {"synapse": "fc1 → query (top-down query W₁ᵀh¹, unhalved)"}
    if net.proj_query is not None:  # Hopfield pooling: the learned queries are the port's constant bias
        queries = net.proj_query.detach().cpu().float().numpy().reshape(-1)
        nodes["wT_fc1"] = nir.Affine(weight=top_down, bias=queries, metadata={**note, "bias": "learned queries Q"})
    else:
        nodes["wT_fc1"] = nir.Linear(weight=top_down, metadata=note)
        w0 = net.proj_weight.detach().cpu().float().numpy()  # (P, d, d): query_drive = x W₀ᵀ per token
        blocks = np.zeros((P * d, P * d, 1, 1), np.float32)  # block-diagonal: NIR's Conv2d type check has no groups
        for p in range(P):
            blocks[p * d:(p + 1) * d, p * d:(p + 1) * d, 0, 0] = w0[p]
        nodes["tokens"] = nir.Input(input_type={"input": np.array([P * d, L, 1])})
        nodes["w0"] = nir.Conv2d(input_shape=(L, 1), weight=blocks, stride=1, padding=0,
                                 dilation=1, groups=1, bias=np.zeros(P * d, np.float32),
                                 metadata={"synapse": "tokens → token_query (W₀ at every token, 1×1 conv)"})
        nodes["token_query"] = nir.Output(output_type={"output": np.array([P * d, L, 1])})
        edges += [("tokens", "w0"), ("w0", "token_query")]
    nodes["query"] = nir.Output(output_type={"output": np.array([P * L * d])})
    edges += [("fc1", "wT_fc1"), ("wT_fc1", "query")]


def _port_text(net: EPNet) -> dict[str, str]:
    spec = net.spec
    if not spec.num_projections:
        return {}
    P, L, d = spec.num_projections, spec.proj_len, spec.dim
    ports = {"port.query": f"output: W₁ᵀh¹{' + Q (learned queries)' if net.proj_query is not None else ''}, "
                           f"the projection layer's query current, layout (P, L, d) = ({P}, {L}, {d}), flat"}
    if net.proj_query is None:
        ports["port.tokens"] = (f"input: the query streams' word vectors as Φ reads them (input_scale applied), "
                                f"layout (P·d, L, 1) = ({P * d}, {L}, 1): channel p·d + e, position l")
        ports["port.token_query"] = "output: X W₀ᵀ, layout (P·d, L, 1); the host adds it to 'query' (transposed)"
    ports["port.host_loop"] = ("each step the host reads the query ports, computes s¹ = softmax(γ q Kᵀ) K with the "
                               "keys K (this sample's tokens) and feeds flat(s¹) into 'input'")
    return ports


def _input_text(net: EPNet) -> str:
    spec = net.spec
    if spec.num_projections:
        return (f"flat(s¹), the projection layer's state ({spec.num_projections}×{spec.proj_len}×{spec.dim} = "
                f"{spec.fc_input_size} values): from the host's retrieval; the round trip holds it at the analog "
                f"free-phase fixed point, constant in time (precomputed)")
    return f"the scaled input x·input_scale (input_scale = {spec.input_scale}), flattened ({spec.fc_input_size} values)"


def lif_limit(graph: Any) -> Any:
    """A copy of `graph` with every IF unit as its no-leak LIF limit, for importers that map `nir.IF` to a
    leaky neuron (snntorch 1.0): τ = 2³⁰·LIF_DT, r = 1, and the edges into the units scaled by 2³⁰, so one
    step of dt = LIF_DT adds I exactly (τ v̇ = −v + r·2³⁰ I; the leak 2⁻³⁰ v per step is below float32's
    resolution of v near the threshold)."""
    import nir

    out = copy.deepcopy(graph)
    units = [n for n, node in out.nodes.items() if isinstance(node, nir.IF)]
    for name in units:
        old = out.nodes[name]
        if not (np.all(old.r == 1) and np.all(old.v_reset == 0)):
            raise ValueError(f"lif_limit rewrites IF units with r = 1 and v_reset = 0; {name} has others")
        size = old.r.shape
        out.nodes[name] = nir.LIF(tau=np.full(size, LIF_GAIN * LIF_DT), r=np.ones(size), v_leak=np.zeros(size),
                                  v_threshold=old.v_threshold.astype(np.float64), v_reset=np.zeros(size),
                                  metadata=dict(old.metadata))
    for src, dst in out.edges:
        node = out.nodes[src]
        if dst in units and isinstance(node, (nir.Affine, nir.Linear)):
            node.weight = node.weight * np.float32(LIF_GAIN)
            if isinstance(node, nir.Affine):
                node.bias = node.bias * np.float32(LIF_GAIN)
    out.metadata = {**out.metadata, "neuron": f"lif: the IF units' no-leak limit, tau = 2^30 dt, inputs × 2^30; "
                                               f"simulate with dt = {LIF_DT} s"}
    return out


def subgraph(graph: Any, source: str, sink: str) -> Any:
    """The nodes on paths from `source` to `sink` (feedback loops among them included), as a graph with one
    Input (`source`, an Input node or a neuron population read as spikes) and one Output (`sink`)."""
    import nir

    def reach(start: str, forward: bool) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            n = todo.pop()
            if n == source and not forward:
                continue  # the source is where the subgraph starts: nothing before it belongs to it
            for a, b in graph.edges:
                nxt = b if forward else a
                if (a if forward else b) == n and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    keep = reach(source, True) & reach(sink, False)
    if sink not in keep:
        raise ValueError(f"no path from {source!r} to {sink!r} in the graph")
    nodes = {n: node for n, node in graph.nodes.items() if n in keep}
    if not isinstance(nodes[source], nir.Input):
        nodes[source] = nir.Input(input_type={"input": np.array(nodes[source].output_type["output"])})
    edges = [(a, b) for a, b in graph.edges if a in keep and b in keep and b != source]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(graph.metadata))


@dataclass
class Export:
    path: Path
    graph: Any
    nodes: int
    edges: int

    def summary(self) -> str:
        ports = [n for n in ("query", "token_query") if n in self.graph.nodes]
        port_text = f"; the attention's query current as port(s) {', '.join(ports)}" if ports else ""
        units = "nir.IF units" if self.graph.metadata["neuron"] == "if" else "units as the no-leak nir.LIF limit of IF"
        return (f"wrote {self.path}: {self.nodes} NIR nodes, {self.edges} edges ({units}, Affine W and Linear Wᵀ "
                f"edges per symmetric synapse{port_text})")


def export_nir(net: EPNet, path: str | Path, metadata: dict[str, Any] | None = None, neuron: str = "if") -> Export:
    import nir

    graph = nir_graph(net, metadata, neuron)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nir.write(path, graph)
    return Export(path, graph, len(graph.nodes), len(graph.edges))


def not_expressible(graph: Any) -> dict[str, str]:
    """{part: reason} for each part of the network the graph could not express (from its metadata)."""
    prefix = "not_expressible."
    return {k[len(prefix):]: v for k, v in graph.metadata.items() if k.startswith(prefix)}


def not_expressible_text(graph: Any) -> str:
    return "\n".join(f"  - {k.replace('_', ' ')}: {v}" for k, v in not_expressible(graph).items())


# ---------------------------------------------------------------- our reference run of the exported network
@torch.no_grad()
def graph_input(net: EPNet, x: torch.Tensor, analog_steps: int = 100, tol: float | None = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the graph's input for embedded x: (B, fc_input_size) float32, the analog prediction)."""
    inputs = net.prepare(x.to(net.weights[0].dtype) if x.dtype.is_floating_point else x)
    state, _ = free_phase(net, inputs, analog_steps, tol=tol)
    source = state[0] if net.spec.num_projections else inputs.flat_x
    return source.reshape(source.shape[0], -1).float(), state[-1].argmax(-1)


@torch.no_grad()
def simulate_exported(net: EPNet, fc_input: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Our run of the exported equations: per FC layer, spikes (steps, B, n). Drives are `layer_drive`.

    Layers are updated bottom-up within a step, so layer n reads this step's spikes below and the
    previous step's spikes above, as a simulator runs the graph's forward and recurrent edges.
    """
    net32 = net if net.weights[0].dtype == torch.float32 else _float_copy(net)
    spec = net32.spec
    B = fc_input.shape[0]
    first_fc = 1 if spec.num_projections else 0  # all projections share the one "proj" layer
    state: list[torch.Tensor] = [fc_input.view(B, spec.num_projections, spec.proj_len, spec.dim)] if first_fc else []
    state += [torch.zeros(B, n) for n in spec.layers]
    inputs = Inputs(None, None, None, None, None if first_fc else fc_input)
    v = [torch.zeros(B, n) for n in spec.layers]
    trains: list[list[torch.Tensor]] = [[] for _ in spec.layers]
    for _ in range(steps):
        for k in range(len(spec.layers)):
            n = k + first_fc
            v[k] = v[k] + net32.layer_drive(inputs, state, n) / 2
            spikes = (v[k] > 1.0).float()
            v[k] = v[k] * (1 - spikes)
            state[n] = spikes
            trains[k].append(spikes)
    return [torch.stack(t) for t in trains]


@torch.no_grad()
def reference_query(net: EPNet, x: torch.Tensor, fc1_spikes: torch.Tensor) -> torch.Tensor:
    """Φ's query current ∂Φ/∂s¹ (B, P, L, d) for tokens x and fc1's spikes: what the query ports must add up to."""
    net32 = net if net.weights[0].dtype == torch.float32 else _float_copy(net)
    inputs = net32.prepare(x.float() if x.dtype.is_floating_point else x)
    state = net32.zero_state(x.shape[0])
    state[1] = fc1_spikes.float()
    return net32.layer_drive(inputs, state, 0)


def token_port_input(net: EPNet, x: torch.Tensor) -> torch.Tensor:
    """The `tokens` port's value for tokens x: (B, P·d, L, 1), the query streams as Φ reads them."""
    inputs = net.prepare(x.to(net.weights[0].dtype) if x.dtype.is_floating_point else x)
    tokens = inputs.query_tokens().float()  # (B, P, L, d)
    B, P, L, d = tokens.shape
    return tokens.permute(0, 1, 3, 2).reshape(B, P * d, L, 1).contiguous()


def _float_copy(net: EPNet) -> EPNet:
    twin = EPNet(net.spec)
    twin.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    return twin


def readout(output_spikes: torch.Tensor) -> torch.Tensor:
    """Class = most output spikes over the second half of the run."""
    T = output_spikes.shape[0]
    return output_spikes[T // 2:].sum(0).argmax(-1)
