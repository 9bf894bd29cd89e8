"""NIR export of the frozen spiking fully connected part, and its round trip through norse.

The exported graph (`nir_graph`) is what NIR's primitives can express of a trained network:

    input ──Affine(W₁/2, b₁/2)──▶ fc1 ──Affine(W₂/2, b₂/2)──▶ fc2 ── … ──▶ out ──▶ output
                                  ▲  ◀──Linear(W₂ᵀ/2)──────  │
    every symmetric synapse W is two edges: W bottom-up (with the bias) and Wᵀ top-down.

Units are `nir.IF` (v ← v + I, spike when v > 1, reset to v_reset = 0), the synaptic current of a unit
is Φ's drive with *spikes* for states, halved: I = ½(W a + b + Wᵀ h) (σ(u) = u/2 in its linear range,
and the ½ is folded into the weights: norse ignores IF's `r`, snntorch rejects r ≠ 1). There are no
time constants in the graph, so dt does not matter: one NIR step is one of our timesteps, whatever dt
a simulator is given. Simulators run the edges of one step in graph order: the bottom-up current uses
this step's spikes, the top-down one (a recurrent edge) the previous step's.

What NIR cannot express, and how it is handled (also in the file's metadata and the CLI output):
- the Hopfield (softmax) attention projection layer: left out. Its output flat(s¹) at the analog
  free-phase fixed point is the graph's *precomputed input* (`graph_input`), constant in time; the
  top-down query W₁ᵀh¹ into that layer is dropped;
- plasticity (EP, C-EP): the graph is frozen, learning stays in `spiking_ep.learning`;
- sigma-delta (signed, graded) spikes and the synaptic trace filter: IF units read spikes directly;
- the hard sigmoid's clamp to [0, 1]: the IF unit integrates u/2 unclamped (its rate saturates in
  [0, 1] for a steady current, transients differ), and it resets to zero instead of by subtraction.
So the exported network is a *different* spiking network with the same weights: `check_round_trip`
measures how its predictions agree with the analog network (97-99 % on the smoke IMDB model).

`simulate_exported` runs the exported equations with `EPNet.layer_drive` (our reference, no NIR
involved); the round trip (nir.write → nir.read → norse `from_nir` → run) must reproduce its output
spike trains. snntorch 1.0.0's `import_from_nir` cannot be used: it maps `nir.IF` to `snn.Leaky(beta=0.9)`
(a leaky neuron) and the recurrent graph fails at run time (docs/energy.md, "NIR").
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analog_ep.dynamics import free_phase
from analog_ep.phi import EPNet, Inputs

NOT_EXPRESSIBLE = {
    "softmax_attention": "the Hopfield (softmax attention) projection layer has no NIR primitive: left out; its "
                         "output flat(s¹) at the analog fixed point is the graph's precomputed, constant input; "
                         "the top-down query W₁ᵀh¹ into it is dropped",
    "plasticity": "NIR graphs are frozen: EP / C-EP learning stays in spiking_ep.learning",
    "sigma_delta_and_traces": "signed graded (sigma-delta) spikes and synaptic trace filters are not exported: "
                              "IF units read the spikes of their neighbours directly",
    "hard_sigmoid_clamp": "no clamp primitive: IF units integrate u/2 unclamped (steady rates still saturate in "
                          "[0, 1])",
    "reset_by_subtraction": "NIR IF resets to v_reset = 0 (the overshoot is lost); our IF units subtract",
}
SEMANTICS = ("IF units: v ← v + I; spike when v > 1; reset to 0. I = Affine(W/2, b/2)(spikes below, this step) + "
             "Linear(Wᵀ/2)(spikes above, previous step). No time constants: one NIR step = one timestep for any dt. "
             "Readout: argmax of output spike counts over the second half of the run.")


def _fc_names(net: EPNet) -> list[str]:
    first_fc = 1 if net.spec.num_projections else 0  # all projections share the one "proj" layer
    return net.spec.layer_names[first_fc:]


def nir_graph(net: EPNet, metadata: dict[str, Any] | None = None) -> Any:
    """The fully connected part of `net` as a NIR graph of IF nodes with W and Wᵀ edges (float32)."""
    import nir

    spec = net.spec
    names = _fc_names(net)
    weights = [w.detach().cpu().float().numpy() for w in net.weights]
    biases = [b.detach().cpu().float().numpy() for b in net.biases]
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array([spec.fc_input_size])})}
    edges: list[tuple[str, str]] = []
    below = "input"
    for k, name in enumerate(names):
        size = spec.layers[k]
        nodes[name] = nir.IF(r=np.ones(size, np.float32), v_threshold=np.ones(size, np.float32),
                             v_reset=np.zeros(size, np.float32), metadata={"layer": name})
        nodes[f"w_{name}"] = nir.Affine(weight=weights[k] / 2, bias=biases[k] / 2,
                                        metadata={"synapse": f"{below} → {name} (bottom-up, W/2 and b/2)"})
        edges += [(below, f"w_{name}"), (f"w_{name}", name)]
        if k > 0:  # the same synapse read top-down: Wᵀ into the layer below
            nodes[f"wT_{name}"] = nir.Linear(weight=np.ascontiguousarray(weights[k].T / 2),
                                             metadata={"synapse": f"{name} → {below} (top-down, Wᵀ/2)"})
            edges += [(name, f"wT_{name}"), (f"wT_{name}", below)]
        below = name
    nodes["output"] = nir.Output(output_type={"output": np.array([spec.layers[-1]])})
    edges.append((names[-1], "output"))
    meta = {"producer": "seqep spiking_ep.nir_export", "network": spec.name, "layers": json.dumps(names),
            "spec": json.dumps(spec.to_dict()), "semantics": SEMANTICS, "input": _input_text(net),
            **{f"not_expressible.{k}": v for k, v in NOT_EXPRESSIBLE.items()}, **(metadata or {})}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={k: str(v) for k, v in meta.items()})


def _input_text(net: EPNet) -> str:
    spec = net.spec
    if spec.num_projections:
        return (f"precomputed: flat(s¹), the projection layer's state at the analog free-phase fixed point "
                f"({spec.num_projections}×{spec.proj_len}×{spec.dim} = {spec.fc_input_size} values), constant in time")
    return f"the scaled input x·input_scale (input_scale = {spec.input_scale}), flattened ({spec.fc_input_size} values)"


@dataclass
class Export:
    path: Path
    graph: Any
    nodes: int
    edges: int

    def summary(self) -> str:
        return (f"wrote {self.path}: {self.nodes} NIR nodes, {self.edges} edges (IF units, Affine W and Linear Wᵀ "
                "edges per symmetric synapse)")


def export_nir(net: EPNet, path: str | Path, metadata: dict[str, Any] | None = None) -> Export:
    import nir

    graph = nir_graph(net, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nir.write(path, graph)
    return Export(path, graph, len(graph.nodes), len(graph.edges))


def not_expressible_text() -> str:
    return "\n".join(f"  - {k.replace('_', ' ')}: {v}" for k, v in NOT_EXPRESSIBLE.items())


# ---------------------------------------------------------------- running the exported network
@torch.no_grad()
def graph_input(net: EPNet, x: torch.Tensor, analog_steps: int = 100, tol: float | None = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the graph's input for embedded x: (B, fc_input_size) float32, the analog prediction)."""
    inputs = net.prepare(x.to(net.weights[0].dtype))
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


def _float_copy(net: EPNet) -> EPNet:
    twin = EPNet(net.spec)
    twin.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    return twin


def run_norse(graph_or_path: Any, fc_input: torch.Tensor, steps: int, dt: float = 1e-3) -> torch.Tensor:
    """Output spikes (steps, B, C) of the graph imported with norse's `from_nir`."""
    import nir
    from norse.torch import from_nir

    graph = nir.read(graph_or_path) if isinstance(graph_or_path, (str, Path)) else graph_or_path
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # norse logs a warning per node it maps loosely
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nirtorch.load's deprecation notice
            module = from_nir(graph, dt=dt)
    finally:
        logging.getLogger().setLevel(level)
    state, out = None, []
    with torch.no_grad():
        for _ in range(steps):
            z, state = module(fc_input, state)
            out.append(z.detach().float())
    return torch.stack(out)


def readout(output_spikes: torch.Tensor) -> torch.Tensor:
    """Class = most output spikes over the second half of the run."""
    T = output_spikes.shape[0]
    return output_spikes[T // 2:].sum(0).argmax(-1)


def check_round_trip(path: str | Path, net: EPNet, x: torch.Tensor, steps: int = 256,
                     y: torch.Tensor | None = None, analog_steps: int = 100) -> dict[str, Any]:
    """Run the file with norse and our reference on the same inputs: spike counts, predictions, agreement."""
    fc_input, analog_pred = graph_input(net, x, analog_steps)
    ours = simulate_exported(net, fc_input, steps)[-1]
    theirs = run_norse(path, fc_input, steps)
    count_diff = (ours.sum(0) - theirs.sum(0)).abs()
    pred = readout(ours)
    result = {
        "samples": int(x.shape[0]), "steps": steps,
        "output_spikes_per_sample": {"ours": float(ours.sum() / x.shape[0]), "norse": float(theirs.sum() / x.shape[0])},
        "max_count_difference": float(count_diff.max()),
        "identical_output_trains": float((ours == theirs).all(0).float().mean()),
        "prediction_match_norse": float((readout(theirs) == pred).float().mean()),
        "agreement_with_analog": float((pred == analog_pred).float().mean()),
    }
    if y is not None:
        result["accuracy"] = float((pred == y).float().mean())
        result["analog_accuracy"] = float((analog_pred == y).float().mean())
    return result
