"""Is the run learning? A check on one epoch's batches, so that no estimator trains to chance silently.

An estimator that has stopped learning leaves a clear trace: the outputs no longer depend on the input
(the same vector for every sample of a batch), the batch accuracy sits at chance, and the batch-mean MSE
sits at the value of the best constant output, ½(C−1)/C for C balanced classes (0.25 for two). Two-phase EP
with a one-sided β collapsed exactly so on the IMDB smoke preset, and C-EP with too small steps never left
that point; `not_learning` names the estimator, the numbers and what to try.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from analog_ep.errors import ConfigError

ACCURACY_MARGIN = 0.03  # above chance by less than this over a whole epoch: not learning
LOSS_MARGIN = 0.005  # a mean loss within this of the constant-output loss (or above it): no better than constant
CONSTANT_SPREAD = 1e-3  # outputs that differ across a batch by less than this are constant
MIN_BATCHES = 10  # fewer batches than this say too little

HINTS = {
    "ep_two_phase": "more ep.free_steps (a free phase stopped short of its fixed point corrupts the one-sided "
                    "estimate), ep.beta_sign=random, or --estimator ep_symmetric",
    "cep": "ep.beta_sign=random, smaller train.lrs or ep.beta, or --estimator ep_symmetric",
}
DEFAULT_HINT = "smaller train.lrs, another ep.beta, or --estimator ep_symmetric"


def constant_output_loss(num_classes: int) -> float:
    """The batch-mean MSE ½‖s − onehot(y)‖² of the best constant output (1/C everywhere), balanced classes."""
    return 0.5 * (num_classes - 1) / num_classes


def not_learning(rows: Iterable[Mapping[str, float]], num_classes: int, estimator: str) -> str | None:
    """A warning when the batches of `rows` (each with "loss", "batch_accuracy" and optionally "output_spread",
    the largest spread of an output unit across the batch) show no learning; None when they do, or are too few.

    Not learning: mean batch accuracy within ACCURACY_MARGIN of chance and either the mean loss no lower than
    the constant output's or every batch's outputs constant.
    """
    rows = list(rows)
    if len(rows) < MIN_BATCHES:
        return None
    chance = 1.0 / num_classes
    accuracy = sum(r["batch_accuracy"] for r in rows) / len(rows)
    loss = sum(r["loss"] for r in rows) / len(rows)
    floor = constant_output_loss(num_classes)
    spreads = [r["output_spread"] for r in rows if r.get("output_spread") is not None]
    constant = bool(spreads) and len(spreads) == len(rows) and max(spreads) < CONSTANT_SPREAD
    if accuracy > chance + ACCURACY_MARGIN or not (constant or loss >= floor - LOSS_MARGIN):
        return None
    what = "its outputs are the same for every sample" if constant else "its loss sits at the constant-output value"
    return (f"estimator {estimator} is not learning: {what} (mean batch accuracy {accuracy:.3f}, chance "
            f"{chance:.3f}; mean loss {loss:.4f}, constant outputs give {floor:.4f}, over {len(rows)} batches); "
            f"try {HINTS.get(estimator, DEFAULT_HINT)}")


NOT_CONVERGED = 0.05  # a unit still moving by 5 % of its range per step at a phase's end is not at a fixed point


def not_converged(max_residual: float, free_steps: int) -> str | None:
    """A warning when an epoch's largest free-phase residual at the phase's end says it stopped short of its
    fixed point (EP's estimate assumes one); None otherwise."""
    if max_residual <= NOT_CONVERGED:
        return None
    return (f"the free phase did not reach its fixed point in {free_steps} steps (largest final residual "
            f"{max_residual:.3g} this epoch, above {NOT_CONVERGED}): EP's update assumes one (symmetric EP "
            "tolerates a shortfall far better than two-phase EP); raise ep.free_steps if accuracy suffers")


UNTRAINABLE = {
    "cep": "C-EP does not train the IMDB/SNLI models: it moves the weights at every nudged step by plain steps "
           "η·increment, and the increments of the first layers are tiny (RMS ~1e-5 on the IMDB smoke shape), so "
           "with the presets' learning rates the weights barely move (smoke preset: test 46.5 %, chance); steps "
           "large enough to learn (Adam-normalised, the learning rate / K per nudged step) feed back into the "
           "state and the Hebbian increments run away (first-layer increment ×60,000 within 8 nudged steps at "
           "lr 1e-3; constant outputs on a 12-token synthetic task at every rate tried). Use --estimator "
           "ep_symmetric; C-EP stays available as analog_ep.estimators.cep and in `seqep gdu` (docs/results.md)",
}


def refuse_untrainable(estimator: str) -> None:
    """A ConfigError, with the measurement, for an estimator known not to train the trainer's models."""
    if estimator in UNTRAINABLE:
        raise ConfigError(f"ep.estimator = {estimator}: {UNTRAINABLE[estimator]}")


@dataclass
class LearningMonitor:
    """Collects one epoch's batches (`add`) and says at its end (`epoch_end`) whether the run is learning."""

    num_classes: int
    estimator: str
    rows: list[dict[str, float]] = field(default_factory=list)

    def add(self, loss: float, batch_accuracy: float, output_spread: float | None = None) -> None:
        self.rows.append({"loss": loss, "batch_accuracy": batch_accuracy, "output_spread": output_spread})

    def add_batch(self, output: torch.Tensor, labels: torch.Tensor, loss: float) -> None:
        """One training batch: its free-phase outputs (B, C), labels and loss."""
        spread = float((output.amax(0) - output.amin(0)).max()) if len(labels) > 1 else None
        self.add(loss, float((output.argmax(-1) == labels).float().mean()), spread)

    def epoch_end(self) -> str | None:
        """The warning for the epoch just ended (None: learning), and a fresh start for the next one."""
        warning, self.rows = not_learning(self.rows, self.num_classes, self.estimator), []
        return warning
