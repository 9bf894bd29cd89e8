"""Running an exported NIR graph in other simulators (norse, snntorch) and the round trip against our reference.

Both consumers go through nirtorch, which executes graphs with one Input and one Output: they run the
spiking part `subgraph(graph, "input", "output")`, and the query ports as their own one-input subgraphs.
- norse 1.1 (`norse.torch.from_nir`) maps `nir.IF` to its IAF cell (v ← v + I, reset to 0): the graph as is.
- snntorch 1.0 (`snntorch.import_nir.import_from_nir`) maps `nir.IF` to `snn.Leaky(beta=0.9)` with its
  hidden state off, which leaks 10 % per step and returns a (spikes, membrane) tuple where the next edge
  expects spikes (`TypeError: linear(): argument 'input' must be Tensor, not tuple`). Its `nir.LIF` import
  (β = 1 − dt/τ at dt = 1e-4 s, threshold divided by r·dt/τ, reset to zero) runs the IF units' no-leak limit
  exactly: it is handed `lif_limit(graph)`, the same network with τ = 2³⁰ dt (β rounds to 1 in float32).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analog_ep.phi import EPNet
from spiking_ep.nir_export import (
    LIF_DT,
    graph_input,
    lif_limit,
    readout,
    reference_query,
    simulate_exported,
    subgraph,
    token_port_input,
)

CONSUMERS = ("norse", "snntorch")


def _read(graph_or_path: Any) -> Any:
    import nir

    return nir.read(graph_or_path) if isinstance(graph_or_path, (str, Path)) else graph_or_path


def _has_if_units(graph: Any) -> bool:
    import nir

    return any(isinstance(n, nir.IF) for n in graph.nodes.values())


@contextlib.contextmanager
def _quiet():
    """The importers print, log and warn per node they map loosely; the check reports what matters itself."""
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.getLogger().setLevel(level)


def norse_module(graph_or_path: Any) -> torch.nn.Module:
    """The graph imported with norse's `from_nir` (dt = LIF_DT for the LIF form; the IF form has no dt)."""
    from norse.torch import from_nir

    graph = _read(graph_or_path)
    with _quiet():
        return from_nir(graph, dt=1e-3 if _has_if_units(graph) else LIF_DT)


def snntorch_module(graph_or_path: Any) -> torch.nn.Module:
    """The graph imported with snntorch's `import_from_nir`, IF units handed over as their LIF limit."""
    from snntorch.import_nir import import_from_nir

    graph = _read(graph_or_path)
    with _quiet():
        return import_from_nir(in_schedule_order(lif_limit(graph) if _has_if_units(graph) else graph))


def in_schedule_order(graph: Any) -> Any:
    """The graph with its nodes listed breadth-first from the input. nirtorch's interpreter (snntorch's import)
    schedules a cyclic graph in the order of the node dict, and `nir.read` returns it alphabetically (HDF5);
    in this order each unit reads this step's spikes from below and the previous step's from above, as the
    graph's semantics say (norse's executor sorts the graph itself)."""
    import nir

    order = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    for name in order:  # grows while it is walked: breadth-first
        order += [b for a, b in graph.edges if a == name and b not in order]
    order += [n for n in graph.nodes if n not in order]
    return nir.NIRGraph(nodes={n: graph.nodes[n] for n in order}, edges=list(graph.edges),
                        metadata=dict(graph.metadata), type_check=False)


MODULES: dict[str, Callable[[Any], torch.nn.Module]] = {"norse": norse_module, "snntorch": snntorch_module}


def run_consumer(consumer: str, graph_or_path: Any, data: torch.Tensor, steps: int) -> torch.Tensor:
    """Outputs (steps, B, …) of the one-input, one-output graph run by `consumer` on constant `data`."""
    module = MODULES[consumer](graph_or_path)
    state, out = None, []
    with torch.no_grad(), _quiet():
        for _ in range(steps):
            z, state = module(data, state)
            out.append(z.detach().float())
    return torch.stack(out)


def run_norse(graph_or_path: Any, fc_input: torch.Tensor, steps: int) -> torch.Tensor:
    """Output spikes (steps, B, C) of the graph's spiking part imported with norse."""
    return run_consumer("norse", subgraph(_read(graph_or_path), "input", "output"), fc_input, steps)


def run_snntorch(graph_or_path: Any, fc_input: torch.Tensor, steps: int) -> torch.Tensor:
    """Output spikes (steps, B, C) of the graph's spiking part imported with snntorch."""
    return run_consumer("snntorch", subgraph(_read(graph_or_path), "input", "output"), fc_input, steps)


def installed_consumers() -> list[str]:
    import importlib.util

    return [c for c in CONSUMERS if importlib.util.find_spec(c) is not None]


def query_port(consumer: str, graph: Any, net: EPNet, x: torch.Tensor, fc1_spikes: torch.Tensor) -> torch.Tensor:
    """The projection layer's query current (B, P, L, d) as `consumer` computes it from the graph's ports."""
    spec = net.spec
    B, P, L, d = x.shape[0], spec.num_projections, spec.proj_len, spec.dim
    query = run_consumer(consumer, subgraph(graph, "fc1", "query"), fc1_spikes, 1)[0].view(B, P, L, d)
    if "token_query" in graph.nodes:
        tokens = run_consumer(consumer, subgraph(graph, "tokens", "token_query"), token_port_input(net, x), 1)[0]
        query = query + tokens.view(B, P, d, L).transpose(-1, -2)
    return query


def tapped(spiking: Any, layer: str) -> Any:
    """The spiking part with its one Output reading `layer` instead of the output layer: same dynamics (the
    output layer still runs and feeds back), another population's spikes out (nirtorch returns one output)."""
    import nir

    nodes = dict(spiking.nodes)
    nodes["output"] = nir.Output(output_type={"output": np.array(spiking.nodes[layer].output_type["output"])})
    edges = [e for e in spiking.edges if e[1] != "output"] + [(layer, "output")]
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=dict(spiking.metadata))


def _compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict[str, float]:
    return {"identical_trains": float((ours == theirs).all(0).float().mean()),
            "max_count_difference": float((ours.sum(0) - theirs.sum(0)).abs().max()),
            "spikes_per_sample": float(theirs.sum() / theirs.shape[1])}


def round_trip(path: str | Path, net: EPNet, x: torch.Tensor, steps: int = 256, y: torch.Tensor | None = None,
               analog_steps: int = 100, consumers: list[str] | None = None) -> dict[str, Any]:
    """Run the file's spiking part in each consumer against our reference run of the exported equations
    (every layer's spike trains and counts, predictions), and its query ports against Φ's query current."""
    graph = _read(path)
    names = json.loads(graph.metadata["layers"])
    fc_input, analog_pred = graph_input(net, x, analog_steps)
    trains = simulate_exported(net, fc_input, steps)
    ours = trains[-1]
    pred = readout(ours)
    result: dict[str, Any] = {
        "samples": int(x.shape[0]), "steps": steps,
        "output_spikes_per_sample": {"ours": float(ours.sum() / x.shape[0])},
        "spikes_per_sample": {name: float(t.sum() / x.shape[0]) for name, t in zip(names, trains)},
        "agreement_with_analog": float((pred == analog_pred).float().mean()),
        "consumers": {},
    }
    spiking = subgraph(graph, "input", "output")
    for consumer in consumers if consumers is not None else installed_consumers():
        theirs = run_consumer(consumer, spiking, fc_input, steps)
        layers = {names[-1]: _compare(ours, theirs)}
        layers.update({name: _compare(t, run_consumer(consumer, tapped(spiking, name), fc_input, steps))
                       for name, t in zip(names[:-1], trains[:-1])})
        entry = {
            "identical_output_trains": layers[names[-1]]["identical_trains"],
            "max_count_difference": layers[names[-1]]["max_count_difference"],
            "prediction_match": float((readout(theirs) == pred).float().mean()),
            "layers": {name: layers[name] for name in names},
        }
        result["output_spikes_per_sample"][consumer] = float(theirs.sum() / x.shape[0])
        if "query" in graph.nodes:  # a spike pattern of fc1: the units that fired during the run
            fc1 = (trains[0].sum(0) > 0).float()
            expected = reference_query(net, x, fc1)
            entry["query_port_max_error"] = float((query_port(consumer, graph, net, x, fc1) - expected).abs().max())
        result["consumers"][consumer] = entry
    if "norse" in result["consumers"]:  # the keys the demo's report reads
        norse = result["consumers"]["norse"]
        result.update(identical_output_trains=norse["identical_output_trains"],
                      max_count_difference=norse["max_count_difference"],
                      prediction_match_norse=norse["prediction_match"])
    if y is not None:
        result["accuracy"] = float((pred == y).float().mean())
        result["analog_accuracy"] = float((analog_pred == y).float().mean())
    return result
