"""Training with spikes: spike-driven EP / C-EP epochs on a `SpikingNet`, written like an analog run.

The loop is the analog trainer's, not a second one: batches come from `analog_ep.train.trainer.batches`,
one step is `analog_ep.train.inner_loop.train_step` (any estimator returning an object with `.applied`),
the optimiser is `make_optimizer` (layer-wise learning rates), checkpoints are `save_model` and the
files `write_json` / `append_jsonl`, so `seqep evaluate`, `seqep spiking-eval` and `plot_run` read a
spiking run as they read an analog one. What differs: the estimator (`spiking_ep_symmetric` or
`spiking_cep`, which read weight updates off spike traces) and the metric (spiking accuracy at the
readout step T = the free phase length, by `evaluate_spiking`).

Layers, inside out:
- `fit_spiking(snet, optimizer, data, cfg, out_dir)`: the core, on any (x, y) batches (synthetic
  tensors in tests, a run's data set otherwise); evaluates before and after, writes the run files.
- `finetune_spiking(run_dir, out_dir, ...)`: a converted analog run, its own data and learning rates.
- `train_spiking_from_scratch(out_dir, task, preset, ...)`: a fresh network from a preset.

Resume (`resume=True`, `seqep spiking-train --out DIR --resume`): `last.pt` is written after the initial
evaluation and after every epoch with the weights, the optimiser state, the progress (epochs, steps, best
validation so far, the initial test evaluation, the curve) and the best weights, so a resumed run continues
after its last completed epoch exactly as the uninterrupted run would have (batch order is a function of
(seed, epoch)). Its configuration is config.json's; only `epochs` may be raised (`resume_options`).

    RUN_DIR/config.json      the analog RunConfig (data, model) + "spiking_train" (this module's config)
    RUN_DIR/spiking.json     the coding it was trained with (read by `seqep spiking-eval`)
    RUN_DIR/metrics.jsonl    "step" rows (loss, batch accuracy at T, spikes) and "epoch" rows
    RUN_DIR/checkpoints/{best,last}.pt, RUN_DIR/report.json, RUN_DIR/plots/{training,spiking_before_after}.png
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import BEST, LAST, load_checkpoint, load_model, save_model
from analog_ep.train.config import RunConfig
from analog_ep.train.inner_loop import param_lrs, train_step
from analog_ep.train.run_dir import append_jsonl, read_jsonl, software_versions, write_json
from spiking_ep.convert import SpikingNet, save_spiking_config, to_spiking
from spiking_ep.evaluate import evaluate_spiking
from spiking_ep.learning import SpikingEPConfig, SpikingEstimate, spiking_cep, spiking_ep_symmetric

Batch = tuple[torch.Tensor, torch.Tensor]
SPIKING_ESTIMATORS = ("spiking_ep", "spiking_cep")
# the control arm: the same loop, data and spiking evaluation, but the analog EP estimator (does plain
# further training improve spiking accuracy at small T as much as learning with spikes does?)
CONTROL_ESTIMATOR = "analog_ep"
# sigma-delta cannot resolve nudge-induced changes below θ/2 (docs/spiking.md §5): learn with IF units
LEARNING_CODINGS = ("if", "bernoulli")
ANALOG_TO_SPIKING = {"ep_symmetric": "spiking_ep", "cep": "spiking_cep"}
# what a resumed run may change (as `analog_ep.train.trainer.RESUMABLE_CHANGES`): more epochs, nothing else
RESUMABLE_CHANGES = ("epochs",)


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


# ---------------------------------------------------------------- data
@dataclass
class Split:
    """A data split as batches: `batches(epoch)` shuffles by (seed, epoch), `batches(None)` keeps the order.

    A function rather than tensors, so a real split is embedded on the fly (never all of it as floats)."""

    make: Callable[[int | None], Iterable[Batch]]
    size: int

    def batches(self, epoch: int | None = None) -> Iterable[Batch]:
        return self.make(epoch)


def epoch_order(n: int, seed: int, epoch: int | None) -> torch.Tensor:
    """The analog trainer's batch order: a function of (seed, epoch), so reruns see the same batches."""
    if epoch is None:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def tensor_split(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> Split:
    """An in-memory split (synthetic tasks, tests)."""
    def make(epoch: int | None) -> Iterable[Batch]:
        order = epoch_order(len(y), seed, epoch)
        return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(y), batch_size)]

    return Split(make, len(y))


def dataset_split(dataset: Any, embedding: torch.Tensor, batch_size: int, dtype: torch.dtype, seed: int = 0,
                  limit: int | None = None, exact_match: bool = False) -> Split:
    """A `SequenceDataset` split through `analog_ep.train.trainer.batches`. `limit`: N samples drawn afresh each
    epoch (training) or one fixed random subset of N (evaluation, `epoch=None`), never the first N: the
    IMDB splits are sorted by label, so their first N reviews are all negative."""
    from analog_ep.train.trainer import batches, seeded_subset

    subset = seeded_subset(len(dataset), limit, seed)
    n = len(subset)

    def make(epoch: int | None) -> Iterable[Batch]:
        order = epoch_order(len(dataset), seed, epoch)[:n] if epoch is not None else subset
        # `batches` walks the whole data set's length: stop after the batches `order` fills
        return islice(batches(dataset, embedding, batch_size, embedding.device, dtype, order, exact_match=exact_match),
                      -(-n // batch_size))

    return Split(make, n)


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split


# ---------------------------------------------------------------- estimator and evaluation
Estimator = Callable[[EPNet, torch.Tensor, torch.Tensor], SpikingEstimate]


def spiking_estimator(snet: SpikingNet, cfg: SpikingTrainConfig, optimizer: torch.optim.Optimizer) -> Estimator:
    """An `analog_ep.train.inner_loop.train_step` estimator: (net, x, y) → estimate with `.applied`.

    Symmetric EP sets `.grad` for the optimiser; C-EP moves the weights itself with the optimiser's
    current learning rates as its local step sizes (as the analog trainer does for `cep`). The control
    "analog_ep" is `analog_ep`'s symmetric EP (free phase `analog_steps`, nudge a quarter of it)."""
    ep = cfg.ep_config()
    if cfg.estimator == CONTROL_ESTIMATOR:
        from analog_ep.estimators import EPConfig, make_estimator

        return make_estimator("ep_symmetric", EPConfig(cfg.beta, cfg.analog_steps, max(cfg.analog_steps // 4, 1),
                                                       tol=1e-4))

    def estimate(net: EPNet, x: torch.Tensor, y: torch.Tensor) -> SpikingEstimate:
        spiking = snet if net is snet.net else dataclasses.replace(snet, net=net)
        if cfg.estimator == "spiking_cep":
            return spiking_cep(spiking, x, y, ep, param_lrs(optimizer, net))
        return spiking_ep_symmetric(spiking, x, y, ep)

    return estimate


def spiking_accuracy(snet: SpikingNet, split: Split, timesteps: Sequence[int], analog_steps: int) -> dict[str, Any]:
    """`evaluate_spiking` on a split, in order; the compact numbers a training log needs."""
    result = evaluate_spiking(snet, split.batches(None), timesteps, analog_steps=analog_steps)
    return {"analog_accuracy": result["analog"]["accuracy"], "samples": result["samples"],
            "accuracy": {T: v["accuracy"] for T, v in result["timesteps"].items()},
            "agreement": {T: v["agreement"] for T, v in result["timesteps"].items()},
            "spikes_per_sample": {T: v["spikes_per_sample"] for T, v in result["timesteps"].items()}}


# ---------------------------------------------------------------- run files
class RunFiles:
    """The files of a spiking run, written with the analog run's atomic helpers (None: write nothing).

    As `seqep train`: a directory that holds a run (checkpoints/last.pt) is refused unless `resume`
    (continue it; then last.pt must exist) or `overwrite` (the edges check first, then write config.json)."""

    def __init__(self, out_dir: str | Path | None, overwrite: bool = False, resume: bool = False) -> None:
        self.dir = Path(out_dir) if out_dir is not None else None
        if self.dir is None:
            if resume:
                raise ConfigError("resuming needs the run directory (out_dir) whose checkpoints/last.pt to continue")
            return
        has_run = (self.dir / "checkpoints" / LAST).exists()
        if resume and not has_run:
            raise ConfigError(f"nothing to resume in {self.dir} (no checkpoints/{LAST}): run without --resume to "
                              "start a run there")
        if has_run and not (resume or overwrite):
            raise ConfigError(f"{self.dir} already holds a run: add --resume to continue it, or pick another --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)

    def truncate_metrics(self, progress: Progress) -> None:
        """Drop the rows logged after `last.pt` (an interrupted epoch's): the resumed run logs them again."""
        if self.dir is None:
            return
        path = self.dir / "metrics.jsonl"
        rows = [r for r in read_jsonl(path)
                if not (r.get("kind") == "step" and r.get("step", 0) > progress.step
                        or r.get("kind") == "epoch" and r.get("epoch", 0) > progress.epoch)]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
        os.replace(tmp, path)

    def log(self, row: dict[str, Any]) -> None:
        if self.dir is not None:
            append_jsonl(self.dir / "metrics.jsonl", row)

    def checkpoint(self, which: str, net: EPNet, **extra: Any) -> None:
        if self.dir is not None:
            save_model(self.dir / "checkpoints" / which, net, **extra)

    def json(self, name: str, obj: dict[str, Any]) -> None:
        if self.dir is not None:
            write_json(self.dir / name, obj)


# ---------------------------------------------------------------- the core
def spikes_per_sample(est: Any) -> float:
    """Spikes of one training step per sample, free and nudged phases (0 for the analog control)."""
    record = getattr(est, "record", None)
    return sum(record.spikes_per_sample().values()) if record is not None else 0.0


@dataclass
class EpochStats:
    seen: int = 0
    correct: int = 0
    loss_sum: float = 0.0
    spikes_sum: float = 0.0
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, est: SpikingEstimate, y: torch.Tensor) -> None:
        self.seen += len(y)
        self.correct += int((est.output.argmax(-1) == y).sum())
        self.loss_sum += est.loss * len(y)
        self.spikes_sum += spikes_per_sample(est) * len(y)

    def summary(self) -> dict[str, float]:
        n = max(self.seen, 1)
        return {"train_accuracy": self.correct / n, "train_loss": self.loss_sum / n,
                "train_spikes_per_sample": self.spikes_sum / n}


def train_epoch(snet: SpikingNet, optimizer: torch.optim.Optimizer, split: Split, cfg: SpikingTrainConfig,
                epoch: int, files: RunFiles, step: int = 0, progress: bool = False) -> tuple[EpochStats, int]:
    """One pass over the training split with `train_step`; "step" rows every `log_every` batches."""
    stats, estimator = EpochStats(), spiking_estimator(snet, cfg, optimizer)
    batches_per_epoch = max(-(-split.size // cfg.batch_size), 1)
    t0 = time.perf_counter()
    for b, (x, y) in enumerate(split.batches(epoch)):
        b0 = time.perf_counter()
        est = train_step(snet.net, estimator, x, y, optimizer)
        if not all(torch.isfinite(p).all() for p in snet.net.parameters()):
            raise FloatingPointError(f"non-finite weights at epoch {epoch + 1} batch {b}: lower the learning "
                                     "rates (--lr-scale) or β")
        stats.add(est, y)
        step += 1
        if step % cfg.log_every == 0:
            files.log({"kind": "step", "step": step, "epoch": epoch + (b + 1) / batches_per_epoch, "loss": est.loss,
                       "batch_accuracy": float((est.output.argmax(-1) == y).float().mean()),
                       "spikes_per_sample": spikes_per_sample(est),
                       "synapse_updates_per_sample": getattr(est, "synapse_updates", {}).get("nudge", 0.0),
                       "seconds_per_batch": time.perf_counter() - b0, "lr": optimizer.param_groups[0]["lr"]})
        if progress:
            print(f"\repoch {epoch + 1} batch {b + 1}/{batches_per_epoch}: acc@T {stats.correct / stats.seen:.3f} "
                  f"loss {stats.loss_sum / stats.seen:.4f}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)
    stats.seconds = time.perf_counter() - t0
    return stats, step


@dataclass
class Progress:
    """What `last.pt` carries besides weights and optimiser, so that a resumed run goes on as the
    uninterrupted one would: `before` is the initial weights' test evaluation, which it cannot redo."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimiser steps (the "step" rows' counter)
    best_val: float = -1.0
    best_epoch: int = 0
    seconds: float = 0.0  # wall time before this process
    before: dict[str, Any] = field(default_factory=dict)
    curve: list[dict[str, Any]] = field(default_factory=list)


def _data_sizes(data: Splits) -> dict[str, int]:
    return {"train": data.train.size, "val": data.val.size, "test": data.test.size}


def _save_last(files: RunFiles, snet: SpikingNet, optimizer: torch.optim.Optimizer, cfg: SpikingTrainConfig,
               data: Splits, state: Progress, best_state: dict[str, torch.Tensor]) -> None:
    files.checkpoint(LAST, snet.net, epoch=state.epoch, spiking=snet.config(), optimizer=optimizer.state_dict(),
                     spiking_train=cfg.to_dict(), progress=dataclasses.asdict(state), data_sizes=_data_sizes(data),
                     best_model={k: v.detach().cpu() for k, v in best_state.items()}, rng=torch.get_rng_state())


def _load_last(files: RunFiles, snet: SpikingNet, optimizer: torch.optim.Optimizer, cfg: SpikingTrainConfig,
               data: Splits) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Restore weights, optimiser, progress and best weights from `last.pt`, refusing another problem."""
    assert files.dir is not None
    ckpt = load_checkpoint(files.dir / "checkpoints" / LAST)
    if "progress" not in ckpt:
        raise ConfigError(f"{files.dir}: its {LAST} predates resumable spiking runs (no progress record); "
                          "start a new --out")
    refuse_changes(ckpt["spiking_train"], cfg.to_dict(), files.dir)
    for split, then in ckpt["data_sizes"].items():
        if _data_sizes(data)[split] != then:
            raise ConfigError(f"{files.dir}: the {split} split has {_data_sizes(data)[split]} samples here and "
                              f"{then} in the run being resumed (--limit / --eval-limit differ): resume with the "
                              "run's own data options, or start a new --out")
    state = Progress(**ckpt["progress"])
    if cfg.epochs < state.epoch:
        raise ConfigError(f"{files.dir} has {state.epoch} completed epochs: resume with --epochs ≥ {state.epoch}")
    snet.net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    files.truncate_metrics(state)
    return state, ckpt["best_model"]


def fit_spiking(snet: SpikingNet, optimizer: torch.optim.Optimizer, data: Splits, cfg: SpikingTrainConfig,
                out_dir: str | Path | None = None, meta: dict[str, Any] | None = None, progress: bool = False,
                overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train `snet.net` with spike-driven EP for `cfg.epochs`; evaluate on test before and after.

    Validation spiking accuracy at T after every epoch (epoch 0: before training) picks `best.pt`
    among the trained epochs; the test split is evaluated at `cfg.all_eval_timesteps` on the initial
    weights and on the best ones, with the same units and T. Returns the report (also report.json).
    `resume`: continue the run in `out_dir` from its `last.pt` (weights, optimiser, progress; `snet`'s
    weights and `optimizer`'s state are replaced); `cfg` may differ from the run's only in `epochs`.
    """
    files = RunFiles(out_dir, overwrite, resume)
    T, t_start = cfg.timesteps, time.perf_counter()
    if resume:
        state, best_state = _load_last(files, snet, optimizer, cfg, data)
        seconds_before = state.seconds
    else:
        if files.dir is not None:
            save_spiking_config(snet, files.dir)
        before = spiking_accuracy(snet, data.test, cfg.all_eval_timesteps, cfg.analog_steps)
        val = spiking_accuracy(snet, data.val, [T], cfg.analog_steps)
        state = Progress(before=before, curve=[_epoch_row(0, None, val, T, 0.0, 0.0)])
        files.log(state.curve[0])
        best_state = copy.deepcopy(snet.net.state_dict())
        state.seconds = time.perf_counter() - t_start
        _save_last(files, snet, optimizer, cfg, data, state, best_state)  # resumable from the first epoch on
        seconds_before = 0.0
    curve = state.curve
    for epoch in range(state.epoch, cfg.epochs):
        stats, state.step = train_epoch(snet, optimizer, data.train, cfg, epoch, files, state.step, progress)
        v0 = time.perf_counter()
        val = spiking_accuracy(snet, data.val, [T], cfg.analog_steps)
        curve.append(_epoch_row(epoch + 1, stats, val, T, stats.seconds, time.perf_counter() - v0))
        files.log(curve[-1])
        if progress:
            print(f"epoch {epoch + 1}: train acc@T={T} {stats.summary()['train_accuracy']:.4f}  val acc@T "
                  f"{curve[-1]['val_accuracy']:.4f}  (analog {val['analog_accuracy']:.4f})", file=sys.stderr)
        if curve[-1]["val_accuracy"] > state.best_val:
            state.best_val, state.best_epoch = curve[-1]["val_accuracy"], epoch + 1
            best_state = copy.deepcopy(snet.net.state_dict())
            files.checkpoint(BEST, snet.net, epoch=epoch + 1, val_accuracy=state.best_val, spiking=snet.config())
        state.epoch, state.seconds = epoch + 1, seconds_before + time.perf_counter() - t_start
        _save_last(files, snet, optimizer, cfg, data, state, best_state)
    if cfg.epochs == 0:
        files.checkpoint(BEST, snet.net, epoch=0, spiking=snet.config())
    snet.net.load_state_dict(best_state)
    after = spiking_accuracy(snet, data.test, cfg.all_eval_timesteps, cfg.analog_steps)
    report = _report(cfg, snet, state.before, after, curve, state.best_epoch,
                     seconds_before + time.perf_counter() - t_start, meta or {})
    report["free_phase_trace"] = analog_free_phase_trace(snet.net, data.val, cfg.analog_steps)
    files.json("report.json", report)
    if files.dir is not None:
        _plots(files.dir, report)
    return report


def analog_free_phase_trace(net: EPNet, split: Split, steps: int) -> dict[str, list[float]]:
    """Residuals and Φ of the analog free phase of the trained weights on one validation batch (≤ 64):
    the fine-tuned model is still an analog model, and this shows it still settles (`plot_run` panel)."""
    from analog_ep.dynamics import free_phase

    x, _ = next(iter(split.batches(None)))
    _, trace = free_phase(net, net.prepare(x[:64]), steps, record_phi=True)
    return {"residuals": trace.residuals, "phi": trace.phi}


def _epoch_row(epoch: int, stats: EpochStats | None, val: dict[str, Any], T: int, seconds: float,
               val_seconds: float) -> dict[str, Any]:
    """An "epoch" row with the analog trainer's keys (so `plot_run` draws it) plus the spiking ones."""
    row: dict[str, Any] = {"kind": "epoch", "epoch": epoch, **(stats.summary() if stats else {}),
                           "val_accuracy": val["accuracy"][str(T)], "val_agreement": val["agreement"][str(T)],
                           "val_analog_accuracy": val["analog_accuracy"], "timesteps": T,
                           "epoch_seconds": seconds, "val_seconds": val_seconds}
    if stats is None:  # before training: no train numbers, so that the curve starts at the initial model
        row["kind"] = "initial"
    return row


def _report(cfg: SpikingTrainConfig, snet: SpikingNet, before: dict, after: dict, curve: list[dict],
            best_epoch: int, seconds: float, meta: dict[str, Any]) -> dict[str, Any]:
    T = str(cfg.timesteps)
    return {
        "status": "completed", "backend": "spiking", "estimator": cfg.estimator, **meta,
        "spiking_train": cfg.to_dict(), "spiking": snet.config(), "timesteps": cfg.timesteps,
        "test_accuracy": after["accuracy"][T], "test_accuracy_before": before["accuracy"][T],
        "test_analog_accuracy": after["analog_accuracy"], "test_analog_accuracy_before": before["analog_accuracy"],
        "improvement": {t: after["accuracy"][t] - before["accuracy"][t] for t in after["accuracy"]},
        "before": before, "after": after, "val_accuracy": max((r["val_accuracy"] for r in curve[1:]), default=None),
        "best_epoch": best_epoch, "epochs_completed": cfg.epochs, "curve": curve, "train_minutes": seconds / 60,
        "n_test": after["samples"], "parameters": sum(p.numel() for p in snet.net.parameters()),
        "software": software_versions(),
    }


def _plots(run_dir: Path, report: dict[str, Any]) -> None:
    """plots/training.png (`analog_ep.train.plots.plot_run`) and plots/spiking_before_after.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analog_ep.train.plots import plot_run

    plot_run(run_dir)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, res, style in (("before", report["before"], "o--"), ("after", report["after"], "o-")):
        Ts = sorted(res["accuracy"], key=int)
        ax.plot([int(t) for t in Ts], [100 * res["accuracy"][t] for t in Ts], style,
                label=f"spiking, {name} (analog {100 * res['analog_accuracy']:.1f} %)")
    ax.set(xscale="log", xlabel="timesteps T", ylabel="test accuracy (%)",
           title=f"{report['estimator']} fine-tuning at T = {report['timesteps']}")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "plots" / "spiking_before_after.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- resume
LIMIT_DEFAULTS: dict[str, int | None] = {"limit": None, "eval_limit": 1000}


def _flag_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "(none)"
    return "(default)" if value is None else str(value)


def refuse_changes(saved: dict[str, Any], given: dict[str, Any], run_dir: str | Path) -> None:
    """A ConfigError naming the first of `given` that differs from the resumed run's `saved` option: another
    T, estimator, coding, β, batch or data subset is another learning problem, not a continuation."""
    for key, value in given.items():
        if key in RESUMABLE_CHANGES or key not in saved:
            continue
        old = saved[key]
        if key == "eval_timesteps":
            value, old = sorted(set(value or ())), sorted(set(old or ()))
        if value != old:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{run_dir}: cannot resume with {flag} {_flag_value(value)}: the run was trained with "
                              f"{flag} {_flag_value(old)}. Drop {flag} to continue the run as it was (only --epochs "
                              f"may change), or start a new --out to train with {flag} {_flag_value(value)}")


def read_resumable(out_dir: str | Path) -> dict[str, Any]:
    """config.json of the spiking run in `out_dir` that `--resume` continues; a ConfigError saying what is missing."""
    out = Path(out_dir)
    missing = [name for name in ("config.json", f"checkpoints/{LAST}") if not (out / name).is_file()]
    if missing:
        raise ConfigError(f"nothing to resume in {out} (no {' and no '.join(missing)}): point --out at the run to "
                          "continue, or run without --resume to start a new one there")
    saved = json.loads((out / "config.json").read_text())
    if "spiking_train" not in saved:
        raise ConfigError(f"{out} is not a spiking run (config.json has no \"spiking_train\"): continue an analog "
                          f"run with `seqep train --out {out} --resume`")
    return saved


def resume_options(out_dir: str | Path, **given: Any) -> tuple[SpikingTrainConfig, dict[str, int | None]]:
    """What `--resume` continues with: config.json's `SpikingTrainConfig` and data limits ("limit",
    "eval_limit"), the explicitly `given` values checked against them (`refuse_changes`). Only `epochs`
    may change, and not below the epochs already completed."""
    saved = read_resumable(out_dir)
    cfg = SpikingTrainConfig.from_dict(saved["spiking_train"])
    limits = {k: saved[k] if k in saved else given.get(k, default) for k, default in LIMIT_DEFAULTS.items()}
    refuse_changes({**cfg.to_dict(), **limits}, given, out_dir)
    done = load_checkpoint(Path(out_dir) / "checkpoints" / LAST).get("progress", {}).get("epoch", 0)
    epochs = given.get("epochs", max(cfg.epochs, done))
    if epochs < done:
        raise ConfigError(f"{out_dir} has {done} completed epochs: resume with --epochs ≥ {done} (or without --epochs)")
    return dataclasses.replace(cfg, epochs=epochs), limits


def _note_resume(out_dir: str | Path, cfg: SpikingTrainConfig, command: str) -> None:
    """config.json stays the run's own; a resume records its command and a raised epoch count."""
    path = Path(out_dir) / "config.json"
    saved = json.loads(path.read_text())
    saved["spiking_train"] = cfg.to_dict()
    saved["resumed"] = [*saved.get("resumed", []), command]
    write_json(path, saved)


# ---------------------------------------------------------------- edges: run directories
def _scaled_optimizer(run_cfg: RunConfig, net: EPNet, lr_scale: float) -> torch.optim.Optimizer:
    """The run's own optimiser and layer-wise learning rates (`make_optimizer`), times `lr_scale`."""
    from analog_ep.train.trainer import make_optimizer

    scaled = copy.deepcopy(run_cfg)
    scaled.train.lrs = [lr * lr_scale for lr in run_cfg.train.lrs]
    return make_optimizer(scaled, net)


def _run_splits(run_cfg: RunConfig, task: Any, embedding: torch.Tensor, cfg: SpikingTrainConfig,
                limit: int | None, eval_limit: int | None, dtype: torch.dtype) -> Splits:
    seed, match = run_cfg.train.seed, run_cfg.data.exact_match
    return Splits(dataset_split(task.train, embedding, cfg.batch_size, dtype, seed, limit, match),
                  dataset_split(task.val, embedding, run_cfg.train.eval_batch_size, dtype, seed, eval_limit, match),
                  dataset_split(task.test, embedding, run_cfg.train.eval_batch_size, dtype, seed, eval_limit, match))


def _write_config(out_dir: str | Path, run_cfg: RunConfig, cfg: SpikingTrainConfig, net: EPNet, command: str,
                  **extra: Any) -> None:
    """config.json in the analog layout ("config" = data + model), so `load_run_data(out_dir)` works."""
    write_json(Path(out_dir) / "config.json", {"config": run_cfg.to_dict(), "command": command,
                                               "spiking_train": cfg.to_dict(), "spec": net.spec.to_dict(), **extra})


def _spiking(net: EPNet, cfg: SpikingTrainConfig) -> SpikingNet:
    return to_spiking(net, cfg.coding, tau=cfg.tau, attention=cfg.attention, seed=cfg.seed)


def finetune_spiking(run_dir: str | Path | None, out_dir: str | Path, epochs: int = 1, timesteps: int = 16,
                     coding: str = "if", limit: int | None = None, eval_limit: int | None = 1000,
                     cfg: SpikingTrainConfig | None = None, progress: bool = True, command: str = "",
                     overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Fine-tune an analog run's best checkpoint with spike-driven EP at T = `timesteps`.

    `limit`: training samples per epoch (drawn from the whole train split); `eval_limit`: first N val
    and test samples. `cfg` overrides everything else (its epochs/timesteps/coding win when given).
    `resume`: continue the fine-tuning in `out_dir` with its own config and limits (`cfg`, if given, may
    only raise the epochs; `run_dir`, if given, must be the run it fine-tunes). Data and weights then come
    from `out_dir` itself, so the source run need not be there any more.
    """
    from analog_ep.train.trainer import load_run_data, seed_everything

    if resume:
        source = read_resumable(out_dir).get("source_run")
        if source is None:
            raise ConfigError(f"{out_dir} was trained from scratch, not fine-tuned: resume it with --from-scratch "
                              "(or without RUN_DIR)")
        if run_dir is not None and Path(run_dir).resolve() != Path(source).resolve():
            raise ConfigError(f"{out_dir} fine-tunes {source}, not {run_dir}: resume without RUN_DIR (or with "
                              f"{source}), or start a new --out to fine-tune {run_dir}")
        run_dir = source
        cfg, limits = resume_options(out_dir, **(cfg.to_dict() if cfg else {}))
        limit, eval_limit = limits["limit"], limits["eval_limit"]
    elif run_dir is None:
        raise ConfigError("fine-tuning needs RUN_DIR, the analog run to fine-tune")
    cfg = cfg or SpikingTrainConfig(timesteps=timesteps, epochs=epochs, coding=coding, lr_scale=0.1)
    seed_everything(cfg.seed)
    run_cfg, task, embedding = load_run_data(out_dir if resume else run_dir, progress=progress)
    net = load_model(out_dir if resume else run_dir, LAST if resume else BEST)[0]
    net = net.to(getattr(torch, run_cfg.train.dtype))
    run_cfg.train.device = "cpu"  # the spiking simulation runs on the CPU (a CUDA run converts there)
    data = _run_splits(run_cfg, task, embedding, cfg, limit, eval_limit, net.weights[0].dtype)
    if resume:
        _note_resume(out_dir, cfg, command)
    else:
        RunFiles(out_dir, overwrite)  # refuse an existing run before writing anything
        _write_config(out_dir, run_cfg, cfg, net, command, source_run=str(run_dir), data_info=task.info,
                      mode="finetune", limit=limit, eval_limit=eval_limit)
    meta = {"task": run_cfg.data.task, "mode": "finetune", "source_run": str(run_dir), "n_train": data.train.size,
            "command": command}
    return fit_spiking(_spiking(net, cfg), _scaled_optimizer(run_cfg, net, cfg.lr_scale), data, cfg, out_dir, meta,
                       progress, overwrite=True, resume=resume)


def _plain(run_cfg: RunConfig) -> Any:
    """A RunConfig as JSON would give it back (tuples → lists), to compare with a saved one."""
    return json.loads(json.dumps(run_cfg.to_dict(), default=str))


def train_spiking_from_scratch(out_dir: str | Path, task: str | None = "imdb", preset: str | None = "smoke",
                               overrides: Sequence[str] = (), epochs: int = 1, timesteps: int = 16,
                               coding: str = "if", limit: int | None = None, eval_limit: int | None = 1000,
                               cfg: SpikingTrainConfig | None = None, progress: bool = True, command: str = "",
                               overwrite: bool = False, config: str | Path | None = None,
                               resume: bool = False) -> dict[str, Any]:
    """A fresh network from `experiments/presets/TASK-PRESET.toml` or a `config` TOML file (+ `--set`
    overrides), trained with spikes.

    The data and model come from the preset exactly as `seqep train` builds them (`load_task_for`,
    `build_model`); spiking EP replaces the analog estimator. Attention defaults to "dense" here: from a
    random start the herding winner sequences of the ±β phases diverge and the first two layers' updates
    are noise (measured: chance level after 3 epochs, docs/spiking.md §8); pass attention="herd" to try.
    `resume`: continue the run in `out_dir` with its own config and limits, as `seqep train --resume`:
    `task` (None: the run's; then `preset` is ignored) or `config`, and `overrides`, must give the run's
    data and model again; `cfg`, if given, may only raise the epochs."""
    from analog_ep.train.config import apply_overrides, load_preset, load_toml
    from analog_ep.train.trainer import build_model, load_task_for, model_embedding, seed_everything

    if resume:
        saved = read_resumable(out_dir)
        if "source_run" in saved:
            raise ConfigError(f"{out_dir} fine-tunes {saved['source_run']}: resume it without --from-scratch")
        base = (load_toml(config) if config else load_preset(task, preset or "smoke") if task
                else RunConfig.from_dict(saved["config"], source=str(Path(out_dir) / "config.json")))
        run_cfg = apply_overrides(base, list(overrides))
        run_cfg.train.device = "cpu"
        if _plain(run_cfg) != _plain(RunConfig.from_dict(saved["config"])):
            raise ConfigError(f"{out_dir}: --task/--preset/--config/--set give another data set or model than the "
                              "run being resumed (its config.json): resume without them, or start a new --out")
        cfg, limits = resume_options(out_dir, **(cfg.to_dict() if cfg else {}))
        limit, eval_limit = limits["limit"], limits["eval_limit"]
        preset_name, overrides = saved.get("preset", str(config or preset)), saved.get("overrides", overrides)
    else:
        run_cfg = apply_overrides(load_toml(config) if config else load_preset(task or "imdb", preset or "smoke"),
                                  list(overrides))
        run_cfg.train.device = "cpu"
        cfg = cfg or SpikingTrainConfig(timesteps=timesteps, epochs=epochs, coding=coding, seed=run_cfg.train.seed)
        if cfg.attention is None:
            cfg = dataclasses.replace(cfg, attention="dense")
        preset_name = str(config or preset)
    seed_everything(run_cfg.train.seed)
    data_set = load_task_for(run_cfg, progress)
    embedding = model_embedding(run_cfg, data_set)
    net = build_model(run_cfg, data_set)
    data = _run_splits(run_cfg, data_set, embedding, cfg, limit, eval_limit, net.weights[0].dtype)
    if resume:
        _note_resume(out_dir, cfg, command)
    else:
        RunFiles(out_dir, overwrite)
        _write_config(out_dir, run_cfg, cfg, net, command, data_info=data_set.info, mode="from_scratch",
                      preset=preset_name, overrides=list(overrides), limit=limit, eval_limit=eval_limit)
    meta = {"task": run_cfg.data.task, "mode": "from_scratch", "preset": preset_name,
            "overrides": list(overrides), "n_train": data.train.size, "command": command}
    return fit_spiking(_spiking(net, cfg), _scaled_optimizer(run_cfg, net, cfg.lr_scale), data, cfg, out_dir, meta,
                       progress, overwrite=True, resume=resume)
