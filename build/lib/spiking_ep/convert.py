"""Analog model (or saved run) → spiking network that runs the same Φ with the same weights.

A `SpikingNet` is a reference to an `EPNet` plus *how its units communicate* (coding, trace time
constant, attention winner rule). Nothing about the architecture is copied: shapes, weights, γ, the
schedule and the nudge all come from the EPNet, so a fine-tuned spiking model is still an analog
model too. `to_spiking(run_dir)` loads through `analog_ep.train.checkpoint.load_model` (map_location CPU),
so a checkpoint trained on CUDA converts and runs on a CPU-only machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import load_model
from spiking_ep.attention import ATTENTION_MODES, SpikingAttention
from spiking_ep.units import Coding, coding_entry, make_coding

SPIKING_CONFIG = "spiking.json"
DEFAULT_CODING = "sigma_delta"  # chosen by measurement: docs/spiking.md, "Choosing the coding"
DEFAULT_TAU = 16.0


@dataclass
class SpikingNet:
    """An EPNet run with spiking units. `config()` is everything needed to rebuild it from the run."""

    net: EPNet
    coding: Coding
    attention: SpikingAttention
    tau: float | None = DEFAULT_TAU  # trace time constant in steps (None: running mean, inference only)
    coding_name: str = DEFAULT_CODING
    coding_options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self):
        return self.net.spec

    def is_attention_layer(self, n: int) -> bool:
        """Layer n is the Hopfield (attention) projection layer, run as a spiking winner-take-all."""
        return bool(self.net.spec.num_projections and n == 0 and self.net.spec.attention)

    def config(self) -> dict[str, Any]:
        return {
            "format": 1,
            "coding": self.coding_name,
            "coding_options": dict(self.coding_options),
            "tau": self.tau,
            "attention": self.attention.mode,
            "seed": self.attention.seed,
        }

    def with_options(self, **changes: Any) -> SpikingNet:
        """The same EPNet with other spiking options (coding, tau, attention, seed, coding_options)."""
        cfg = self.config()
        if "coding" in changes and changes["coding"] != cfg["coding"]:  # another coding: its own defaults
            cfg.update(attention=None, coding_options={})
        cfg.update(changes)
        return to_spiking(self.net, cfg["coding"], tau=cfg["tau"], attention=cfg["attention"], seed=cfg["seed"],
                          **cfg["coding_options"])


def to_spiking(
    model: EPNet | str | Path,
    coding: str = DEFAULT_CODING,
    tau: float | None = DEFAULT_TAU,
    attention: str | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    **coding_options: Any,
) -> SpikingNet:
    """Wrap an EPNet, a checkpoint file or a run directory as a spiking network.

    coding: "sigma_delta" (default, θ = 1/32: fastest and sparsest for inference), "if" (the coding to
    learn with: its precision grows with the window), "bernoulli", the adapters "snntorch" / "norse", or a
    coding added with `spiking_ep.units.register_coding`.
    tau: time constant (steps) of the synaptic traces of IF / Bernoulli units. attention: the winner
    rule of the Hopfield layer ("herd", "sample", or "dense" for the non-spiking ablation); default by
    coding. `coding_options` go to the coding (e.g. threshold=1/32 for sigma-delta, v0 for IF).

    Example:
        >>> from analog_ep.models import build_spec
        >>> snet = to_spiking(EPNet(build_spec("imdb", tiny=True), seed=0), coding="if", tau=8)
        >>> snet.config()
        {'format': 1, 'coding': 'if', 'coding_options': {}, 'tau': 8, 'attention': 'herd', 'seed': 0}
        >>> to_spiking(snet.net, coding="bernoulli").attention.mode  # stochastic units: sampled winners
        'sample'
    """
    net = model if isinstance(model, EPNet) else load_model(model, device=device)[0]
    entry = coding_entry(coding)
    attention = attention or entry.attention  # deterministic codings herd, stochastic ones sample
    if attention not in ATTENTION_MODES:
        raise ConfigError(f"unknown attention mode {attention!r}; choose one of {', '.join(ATTENTION_MODES)}")
    if tau is not None and tau < 1:
        raise ConfigError(f"tau is a time constant in steps and must be ≥ 1, got {tau}")
    options = dict(coding_options)
    if entry.seeded:
        options.setdefault("seed", seed)
    unit = make_coding(coding, **options)
    return SpikingNet(net, unit, SpikingAttention(attention, seed), tau, coding, options)


def save_spiking_config(snet: SpikingNet, run_dir: str | Path) -> Path:
    """Write RUN_DIR/spiking.json: the spiking options; the weights stay in the analog checkpoint."""
    path = Path(run_dir) / SPIKING_CONFIG
    path.write_text(json.dumps(snet.config(), indent=2) + "\n")
    return path


def load_spiking(run_dir: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> SpikingNet:
    """A run directory's analog checkpoint with its spiking.json options (defaults if there is none)."""
    net, _ = load_model(run_dir, device=device)
    cfg: dict[str, Any] = {}
    path = Path(run_dir) / SPIKING_CONFIG
    if Path(run_dir).is_dir() and path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path} is not valid JSON ({err}); re-run `seqep convert {run_dir}`") from err
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "coding" in overrides and overrides["coding"] != cfg.get("coding"):  # another coding: its own defaults
        cfg.pop("attention", None)
        cfg.pop("coding_options", None)
    cfg.update(overrides)
    return to_spiking(net, cfg.get("coding", DEFAULT_CODING), tau=cfg.get("tau", DEFAULT_TAU),
                      attention=cfg.get("attention"), seed=cfg.get("seed", 0), **cfg.get("coding_options", {}))
