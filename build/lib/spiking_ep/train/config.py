"""What a spiking training run is configured by, beyond the network: `SpikingTrainConfig` and its choices."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from analog_ep.errors import ConfigError
from spiking_ep.learning import SpikingEPConfig

SPIKING_ESTIMATORS = ("spiking_ep", "spiking_cep")
# the control arm: the same loop, data and spiking evaluation, but the analog EP estimator (does plain
# further training improve spiking accuracy at small T as much as learning with spikes does?)
CONTROL_ESTIMATOR = "analog_ep"
# sigma-delta cannot resolve nudge-induced changes below θ/2 (docs/spiking.md §5): learn with IF units
LEARNING_CODINGS = ("if", "bernoulli")
ANALOG_TO_SPIKING = {"ep_symmetric": "spiking_ep", "cep": "spiking_cep"}
# what a resumed run may change (as the analog trainer's): more epochs and the checkpoint intervals, nothing learnt
RESUMABLE_CHANGES = ("epochs", "checkpoint_minutes", "checkpoint_every")
# the data options of a run directory (config.json) besides its SpikingTrainConfig
LIMIT_DEFAULTS: dict[str, int | None] = {"limit": None, "eval_limit": 1000}


@dataclass(frozen=True)
class SpikingTrainConfig:
    """A spiking training run beyond the network. `timesteps` is T, the free phase in training *and* the
    readout step it is evaluated at: the network learns to be right after T steps of spikes."""

    timesteps: int = 16
    nudge_steps: int | None = None  # None: T/2
    window: int | None = None  # nudged steps the Hebbian products accumulate over (None: half the nudge)
    beta: float = 0.2
    estimator: str = "spiking_ep"
    hebbian: str = "trace"
    plasticity_tau: float | None = None  # spiking C-EP only
    coding: str = "if"
    tau: float = 8.0
    attention: str | None = None  # None: the coding's default (herding for IF)
    epochs: int = 1
    batch_size: int = 32
    lr_scale: float = 1.0  # multiplies the learning rates of the optimiser the edges build
    eval_timesteps: tuple[int, ...] = ()  # also evaluated before/after on the test split (T always is)
    analog_steps: int = 100  # analog reference free phase of the evaluations
    seed: int = 0
    log_every: int = 10
    checkpoint_minutes: float = 5.0  # last.pt also every so many minutes within an epoch (always at its end)
    checkpoint_every: int | None = None  # ... and every N optimiser steps (None: by time only)

    def __post_init__(self) -> None:
        if self.estimator not in (*SPIKING_ESTIMATORS, CONTROL_ESTIMATOR):
            raise ConfigError(f"estimator must be one of {(*SPIKING_ESTIMATORS, CONTROL_ESTIMATOR)}, "
                              f"got {self.estimator!r}")
        if self.coding not in LEARNING_CODINGS:
            raise ConfigError(f"learning needs {' or '.join(LEARNING_CODINGS)} units, not {self.coding!r}: "
                              "sigma-delta units do not resolve the nudge (docs/spiking.md §5); evaluate the "
                              "trained run with sigma-delta afterwards if you like")
        if self.timesteps < 2 or self.epochs < 0 or self.batch_size < 1 or self.lr_scale <= 0:
            raise ConfigError("need timesteps ≥ 2, epochs ≥ 0, batch_size ≥ 1 and lr_scale > 0")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ConfigError("checkpoint_every must be ≥ 1 step, or None (checkpoint by time only)")
        self.ep_config()  # validates beta, nudge and window

    def ep_config(self) -> SpikingEPConfig:
        nudge = self.nudge_steps or max(self.timesteps // 2, 1)
        return SpikingEPConfig(self.beta, self.timesteps, nudge, self.window, self.hebbian, self.plasticity_tau)

    @property
    def all_eval_timesteps(self) -> list[int]:
        return sorted({self.timesteps, *self.eval_timesteps})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SpikingTrainConfig:
        """From `to_dict` / config.json's "spiking_train" (JSON turns the tuple into a list)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        values["eval_timesteps"] = tuple(values.get("eval_timesteps") or ())
        return cls(**values)

