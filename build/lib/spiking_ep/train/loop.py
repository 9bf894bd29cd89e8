"""The spiking trainer's core: `fit_spiking` trains a `SpikingNet` on any (x, y) batches, written like an analog run.

The loop is the analog trainer's, not a second one: one step is `analog_ep.train.inner_loop.train_step`,
the run directory's lifecycle is `analog_ep.train.lifecycle.RunDir` (last.pt with a `Progress`, metrics.jsonl
cut back on resume, the lock) and Ctrl-C / SIGTERM stop between batches (`analog_ep.train.stop_signals`).
`last.pt` is written after the initial evaluation, within an epoch every `checkpoint_minutes` (and every
`checkpoint_every` steps), after every epoch and when a signal stops the run, so a resumed run continues
from the batch where it stopped exactly as the uninterrupted run would have (batch order is a function of
(seed, epoch)).
"""

from __future__ import annotations

import copy
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import BEST
from analog_ep.train.inner_loop import train_step
from analog_ep.train.lifecycle import EpochTally, Progress, RunDir
from analog_ep.train.stop_signals import Interrupted, StopRequest, stop_between_batches
from spiking_ep.convert import SpikingNet, save_spiking_config
from spiking_ep.train.config import SpikingTrainConfig
from spiking_ep.train.estimator import spikes_per_sample, spiking_accuracy, spiking_estimator
from spiking_ep.train.report import build_report, write_plots
from spiking_ep.train.resume import refuse_changes, resume_command
from spiking_ep.train.splits import Split, Splits


class Unsaved:
    """The run directory of a run that writes nothing (`out_dir=None`: tests, notebooks)."""

    path = None

    def start(self) -> None: ...
    def close(self) -> None: ...
    def log(self, row: dict[str, Any]) -> None: ...
    def write_json(self, name: str, obj: Any) -> None: ...
    def save_checkpoint(self, which: str, net: EPNet, **extra: Any) -> None: ...
    def save_last(self, net: EPNet, progress: Progress, **extra: Any) -> None: ...


def open_run(out_dir: str | Path | None, overwrite: bool = False, resume: bool = False) -> RunDir | Unsaved:
    """As `seqep train`: a directory that holds a run (checkpoints/last.pt) is refused unless `resume`
    (continue it; then last.pt must exist) or `overwrite` (the edges check first, then write config.json)."""
    if out_dir is None:
        if resume:
            raise ConfigError("resuming needs the run directory (out_dir) whose checkpoints/last.pt to continue")
        return Unsaved()
    return RunDir(Path(out_dir), resume=resume, overwrite=overwrite, resume_command=resume_command(out_dir))


def train_epoch(snet: SpikingNet, optimizer: torch.optim.Optimizer, split: Split, cfg: SpikingTrainConfig,
                state: Progress, run: RunDir | Unsaved, save: Any = None, stop: StopRequest | None = None,
                progress: bool = False) -> None:
    """The rest of epoch `state.epoch` from batch `state.batch` with `train_step`, counted in `state`;
    "step" rows every `log_every` batches, `save()` when a checkpoint is due, `stop` checked between batches."""
    estimator, stop = spiking_estimator(snet, cfg, optimizer), stop or StopRequest()
    batches_per_epoch = max(-(-split.size // cfg.batch_size), 1)
    tally, last_save = state.tally, time.perf_counter()
    for x, y in islice(split.batches(state.epoch), state.batch, None):
        stop.check()
        b0 = time.perf_counter()
        est = train_step(snet.net, estimator, x, y, optimizer)
        if not all(torch.isfinite(p).all() for p in snet.net.parameters()):
            raise FloatingPointError(f"non-finite weights at epoch {state.epoch + 1} batch {state.batch}: lower the "
                                     "learning rates (--lr-scale) or β")
        tally.add(est.output, y, est.loss, spikes=spikes_per_sample(est))
        state.batch += 1
        state.step += 1
        if state.step % cfg.log_every == 0:
            run.log({"kind": "step", "step": state.step, "epoch": state.epoch + state.batch / batches_per_epoch,
                     "loss": est.loss, "batch_accuracy": float((est.output.argmax(-1) == y).float().mean()),
                     "spikes_per_sample": spikes_per_sample(est),
                     "synapse_updates_per_sample": getattr(est, "synapse_updates", {}).get("nudge", 0.0),
                     "seconds_per_batch": time.perf_counter() - b0, "lr": optimizer.param_groups[0]["lr"]})
        if save is not None and (time.perf_counter() - last_save > 60 * cfg.checkpoint_minutes or
                                 cfg.checkpoint_every is not None and state.step % cfg.checkpoint_every == 0):
            save()
            last_save = time.perf_counter()
        if progress:
            print(f"\repoch {state.epoch + 1} batch {state.batch}/{batches_per_epoch}: acc@T {tally.accuracy:.3f} "
                  f"loss {tally.loss:.4f}", end="", file=sys.stderr)
    if progress:
        print(file=sys.stderr)


def _data_sizes(data: Splits) -> dict[str, int]:
    return {"train": data.train.size, "val": data.val.size, "test": data.test.size}


def _load_last(run: RunDir, snet: SpikingNet, optimizer: torch.optim.Optimizer, cfg: SpikingTrainConfig,
               data: Splits) -> tuple[Progress, dict[str, torch.Tensor]]:
    """Restore weights, optimiser, progress and best weights from `last.pt`, refusing another problem."""
    ckpt, state = run.load_last()
    if "progress" not in ckpt:
        raise ConfigError(f"{run.path}: its last.pt predates resumable spiking runs (no progress record); "
                          "start a new --out")
    refuse_changes(ckpt["spiking_train"], cfg.to_dict(), run.path)
    for split, then in ckpt["data_sizes"].items():
        if _data_sizes(data)[split] != then:
            raise ConfigError(f"{run.path}: the {split} split has {_data_sizes(data)[split]} samples here and "
                              f"{then} in the run being resumed (--limit / --eval-limit differ): resume with the "
                              "run's own data options, or start a new --out")
    if cfg.epochs < state.epoch:
        raise ConfigError(f"{run.path} has {state.epoch} completed epochs: resume with --epochs ≥ {state.epoch}")
    snet.net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    run.continue_metrics(ckpt)
    return state, ckpt["best_model"]


def epoch_row(epoch: float, tally: EpochTally | None, val: dict[str, Any], T: int, seconds: float,
              val_seconds: float) -> dict[str, Any]:
    """An "epoch" row with the analog trainer's keys (so `plot_run` draws it) plus the spiking ones."""
    train = {"train_accuracy": tally.accuracy, "train_loss": tally.loss,
             "train_spikes_per_sample": tally.spikes_sum / max(tally.seen, 1)} if tally else {}
    row: dict[str, Any] = {"kind": "epoch", "epoch": epoch, **train,
                           "val_accuracy": val["accuracy"][str(T)], "val_agreement": val["agreement"][str(T)],
                           "val_analog_accuracy": val["analog_accuracy"], "timesteps": T,
                           "epoch_seconds": seconds, "val_seconds": val_seconds}
    if tally is None:  # before training: no train numbers, so that the curve starts at the initial model
        row["kind"] = "initial"
    return row


def fit_spiking(snet: SpikingNet, optimizer: torch.optim.Optimizer, data: Splits, cfg: SpikingTrainConfig,
                out_dir: str | Path | None = None, meta: dict[str, Any] | None = None, progress: bool = False,
                overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train `snet.net` with spike-driven EP for `cfg.epochs`; evaluate on test before and after.

    Validation spiking accuracy at T after every epoch (epoch 0: before training) picks `best.pt`
    among the trained epochs; the test split is evaluated at `cfg.all_eval_timesteps` on the initial
    weights and on the best ones, with the same units and T. Returns the report (also report.json).
    `resume`: continue the run in `out_dir` from its `last.pt` (weights, optimiser, progress; `snet`'s
    weights and `optimizer`'s state are replaced); `cfg` may differ from the run's only in `epochs`.
    Ctrl-C / SIGTERM: the batch in progress is finished, last.pt saved, the resume command printed and
    `Interrupted` raised.
    """
    run = open_run(out_dir, overwrite, resume)
    run.start()
    try:
        return _fit(run, snet, optimizer, data, cfg, meta or {}, progress, resume)
    finally:
        run.close()


def _fit(run: RunDir | Unsaved, snet: SpikingNet, optimizer: torch.optim.Optimizer, data: Splits,
         cfg: SpikingTrainConfig, meta: dict[str, Any], progress: bool, resume: bool) -> dict[str, Any]:
    T, t_start = cfg.timesteps, time.perf_counter()
    if resume:
        assert isinstance(run, RunDir)
        state, best_state = _load_last(run, snet, optimizer, cfg, data)
    else:
        state, best_state = Progress(best_epoch=0), copy.deepcopy(snet.net.state_dict())
    seconds_before, epoch_t0, epoch_seconds_before = state.elapsed, t_start, state.tally.seconds

    def save_last() -> None:
        now = time.perf_counter()
        state.elapsed, state.tally.seconds = seconds_before + now - t_start, epoch_seconds_before + now - epoch_t0
        run.save_last(snet.net, state, epoch=state.epoch, spiking=snet.config(), optimizer=optimizer.state_dict(),
                      spiking_train=cfg.to_dict(), data_sizes=_data_sizes(data),
                      best_model={k: v.detach().cpu() for k, v in best_state.items()})

    with stop_between_batches() as stop:
        try:
            if not resume:
                if run.path is not None:
                    save_spiking_config(snet, run.path)
                state.before = spiking_accuracy(snet, data.test, cfg.all_eval_timesteps, cfg.analog_steps)
                val = spiking_accuracy(snet, data.val, [T], cfg.analog_steps)
                state.curve = [epoch_row(0, None, val, T, 0.0, 0.0)]
                run.log(state.curve[0])
                save_last()  # resumable from the first epoch on
            while state.epoch < cfg.epochs:
                epoch_t0, epoch_seconds_before = time.perf_counter(), state.tally.seconds
                train_epoch(snet, optimizer, data.train, cfg, state, run, save_last, stop, progress)
                seconds = epoch_seconds_before + time.perf_counter() - epoch_t0
                v0 = time.perf_counter()
                val = spiking_accuracy(snet, data.val, [T], cfg.analog_steps)
                state.curve.append(epoch_row(state.epoch + 1, state.tally, val, T, seconds, time.perf_counter() - v0))
                run.log(state.curve[-1])
                if progress:
                    print(f"epoch {state.epoch + 1}: train acc@T={T} {state.tally.accuracy:.4f}  val acc@T "
                          f"{state.curve[-1]['val_accuracy']:.4f}  (analog {val['analog_accuracy']:.4f})",
                          file=sys.stderr)
                if state.curve[-1]["val_accuracy"] > state.best_val:
                    state.best_val, state.best_epoch = state.curve[-1]["val_accuracy"], state.epoch + 1
                    best_state = copy.deepcopy(snet.net.state_dict())
                    run.save_checkpoint(BEST, snet.net, epoch=state.epoch + 1, val_accuracy=state.best_val,
                                        spiking=snet.config())
                state.epoch, state.batch, state.tally = state.epoch + 1, 0, EpochTally()
                epoch_t0, epoch_seconds_before = time.perf_counter(), 0.0
                save_last()
            stop.check()  # a stop asked for during the last validation: the run is saved, the report not written
        except Interrupted:
            if not state.curve:  # stopped during the initial evaluation: there is nothing to continue from yet
                print(f"\ninterrupted before the first checkpoint: nothing was saved; start {run.path} again "
                      "without --resume", file=sys.stderr)
                raise
            save_last()
            if isinstance(run, RunDir):
                print(f"\n{run.interrupted_message(state)}", file=sys.stderr)
            raise
    if cfg.epochs == 0:
        run.save_checkpoint(BEST, snet.net, epoch=0, spiking=snet.config())
    snet.net.load_state_dict(best_state)
    after = spiking_accuracy(snet, data.test, cfg.all_eval_timesteps, cfg.analog_steps)
    report = build_report(cfg, snet, state.before, after, state.curve, state.best_epoch,
                          seconds_before + time.perf_counter() - t_start, meta)
    report["free_phase_trace"] = analog_free_phase_trace(snet.net, data.val, cfg.analog_steps)
    run.write_json("report.json", report)
    if run.path is not None:
        write_plots(run.path, report)
    return report


def analog_free_phase_trace(net: EPNet, split: Split, steps: int) -> dict[str, list[float]]:
    """Residuals and Φ of the analog free phase of the trained weights on one validation batch (≤ 64):
    the fine-tuned model is still an analog model, and this shows it still settles (`plot_run` panel)."""
    from analog_ep.dynamics import free_phase

    x, _ = next(iter(split.batches(None)))
    _, trace = free_phase(net, net.prepare(x[:64]), steps, record_phi=True)
    return {"residuals": trace.residuals, "phi": trace.phi}
