"""The spiking trainer's entry points on run directories: fine-tune an analog run, or train from a preset.

- `finetune_spiking(run_dir, out_dir, ...)`: a converted analog run, its own data and learning rates.
- `train_spiking_from_scratch(out_dir, task, preset, ...)`: a fresh network from a preset.

Both write config.json in the analog layout (+ "spiking_train") and hand the run to `fit_spiking`; with
`resume` they continue the run in `out_dir` with its own config and data limits (only `epochs` may change).
The directory's lock is held from the moment they write to it.

    RUN_DIR/config.json      the analog RunConfig (data, model) + "spiking_train" (SpikingTrainConfig)
    RUN_DIR/spiking.json     the coding it was trained with (read by `seqep spiking-eval`)
    RUN_DIR/metrics.jsonl    "step" rows (loss, batch accuracy at T, spikes) and "epoch" rows
    RUN_DIR/checkpoints/{best,last}.pt, RUN_DIR/report.json, RUN_DIR/plots/{training,spiking_before_after}.png
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet
from analog_ep.train import run_lock
from analog_ep.train.checkpoint import BEST, LAST, load_model
from analog_ep.train.config import RunConfig
from analog_ep.train.run_dir import write_json
from spiking_ep.convert import SpikingNet, to_spiking
from spiking_ep.train.config import SpikingTrainConfig
from spiking_ep.train.loop import fit_spiking, open_run
from spiking_ep.train.resume import note_resume, read_resumable, resume_options
from spiking_ep.train.splits import Splits, dataset_split


def _scaled_optimizer(run_cfg: RunConfig, net: EPNet, lr_scale: float) -> torch.optim.Optimizer:
    """The run's own optimiser and layer-wise learning rates (`make_optimizer`), times `lr_scale`."""
    from analog_ep.train.trainer import make_optimizer

    scaled = copy.deepcopy(run_cfg)
    scaled.train.lrs = [lr * lr_scale for lr in run_cfg.train.lrs]
    return make_optimizer(scaled, net)


def _run_splits(run_cfg: RunConfig, task: Any, embedding: torch.Tensor, cfg: SpikingTrainConfig,
                limit: int | None, eval_limit: int | None, dtype: torch.dtype) -> Splits:
    seed, match = run_cfg.train.seed, run_cfg.data.pair_features
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
    meta = {"task": run_cfg.data.task, "mode": "finetune", "source_run": str(run_dir), "n_train": data.train.size,
            "command": command}
    with run_lock.held(out_dir):
        if resume:
            note_resume(out_dir, cfg, command)
        else:
            open_run(out_dir, overwrite)  # refuse an existing run before writing anything
            _write_config(out_dir, run_cfg, cfg, net, command, source_run=str(run_dir), data_info=task.info,
                          mode="finetune", limit=limit, eval_limit=eval_limit)
        return fit_spiking(_spiking(net, cfg), _scaled_optimizer(run_cfg, net, cfg.lr_scale), data, cfg, out_dir,
                           meta, progress, overwrite=True, resume=resume)


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
    meta = {"task": run_cfg.data.task, "mode": "from_scratch", "preset": preset_name,
            "overrides": list(overrides), "n_train": data.train.size, "command": command}
    with run_lock.held(out_dir):
        if resume:
            note_resume(out_dir, cfg, command)
        else:
            open_run(out_dir, overwrite)  # refuse an existing run before writing anything
            _write_config(out_dir, run_cfg, cfg, net, command, data_info=data_set.info, mode="from_scratch",
                          preset=preset_name, overrides=list(overrides), limit=limit, eval_limit=eval_limit)
        return fit_spiking(_spiking(net, cfg), _scaled_optimizer(run_cfg, net, cfg.lr_scale), data, cfg, out_dir,
                           meta, progress, overwrite=True, resume=resume)
