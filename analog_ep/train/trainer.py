"""The trainer: data → model → EP epochs with checkpoints, metrics and resume → test once → report.

Nothing is lost on interruption: `last.pt` is written atomically (`lifecycle.RunDir`) at every epoch end,
every `train.checkpoint_minutes` (and every `train.checkpoint_every` steps), and on Ctrl-C or SIGTERM
after the batch in progress; `--resume` continues from the exact batch where it stopped (batch order is a
function of (seed, epoch), so the resumed run sees the same batches) and metrics.jsonl from the
checkpoint's row, so the resumed run's files are the uninterrupted run's.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from analog_ep.data import TaskData, add_ngrams, embed_batch, load_task
from analog_ep.data.ngrams import word_ids
from analog_ep.dynamics import free_phase
from analog_ep.embedding import NO_PAIR_FEATURES, PAD_ID, PairFeatures
from analog_ep.errors import ConfigError
from analog_ep.estimators import ESTIMATORS, EPConfig, Estimator, make_estimator, training_beta_sign
from analog_ep.fast.allocator import keep_freed_memory
from analog_ep.fast.folded import resolve_fold
from analog_ep.fast.lowp_weights import int8_kernel_name
from analog_ep.fast.precision import resolve_precision
from analog_ep.fast.retrieval import enable_fused_fp32
from analog_ep.models import build_spec
from analog_ep.phi import EPNet, enable_compiled_kernels
from analog_ep.train import distributed
from analog_ep.train.checkpoint import BEST
from analog_ep.train.config import RunConfig
from analog_ep.train.health import LearningMonitor, not_converged, refuse_untrainable
from analog_ep.train.inner_loop import layer_param_groups, param_lrs, train_step
from analog_ep.train.lifecycle import EpochTally, Progress, refuse_changes
from analog_ep.train.run_dir import software_versions
from analog_ep.train.stop_signals import Interrupted, StopRequest, stop_between_batches


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_task_for(cfg: RunConfig, progress: bool = True) -> TaskData:
    d = cfg.data
    task = load_task(d.task, data_dir=d.data_dir, max_len=d.max_len, vectors=d.vectors, min_freq=d.min_freq,
                     max_vocab=d.max_vocab, oov=d.oov, val_size=d.val_size, train_limit=d.train_limit,
                     eval_limit=d.eval_limit, seed=cfg.train.seed, progress=progress)
    return add_ngrams(task, d.ngrams, d.ngram_min_freq)


def build_model(cfg: RunConfig, task: TaskData) -> EPNet:
    m = cfg.model
    options = dict(seq_len=task.max_len, dim=task.dim + cfg.data.extra_channels(task.dim), hidden=tuple(m.hidden),
                   num_classes=task.num_classes,
                   attention=m.attention, mask_padding=m.mask_padding, pool_queries=m.pool_queries,
                   bias_offset=m.bias_offset, init_gain=m.init_gain, schedule=m.schedule)
    if m.gamma is not None:
        options["gamma"] = m.gamma
    vectors = model_embedding(cfg, task)
    options["input_scale"] = m.input_scale if m.input_scale is not None else auto_input_scale(
        vectors[: word_ids(task)])
    if m.learn_embeddings:  # the table joins Φ's parameters, starting from the word vectors the model would read
        options.update(vocab_size=vectors.shape[0], exact_match=cfg.data.exact_match)
    net = EPNet(build_spec(task.name, **options), seed=cfg.train.seed)
    if net.embedding is not None:
        with torch.no_grad():
            net.embedding.copy_(vectors)
            # rows with no vector to start from (UNK) start small and random, so that they can learn
            blank = (vectors[1:] == 0).all(1).nonzero().flatten() + 1
            gen = torch.Generator().manual_seed(cfg.train.seed)
            net.embedding[blank] = 0.1 * torch.randn(len(blank), vectors.shape[1], generator=gen)
    return net.to(device=cfg.train.device, dtype=getattr(torch, cfg.train.dtype))


TARGET_INPUT_RMS = 0.6
WHITEN_FLOOR = 1e-6  # eigenvalues below this fraction of the largest are not amplified further ("whiten")


def auto_input_scale(embedding: torch.Tensor) -> float:
    """Scale that brings the word vectors' entries to RMS 0.6 (what GloVe-50 has natively).

    Gensim word2vec trained on IMDB has entries of RMS ≈ 0.07: without rescaling the input barely
    moves the hard-sigmoid units, the network learns its biases first and saturates (measured: 50 %
    accuracy after 90 batches). Rows 0 and 1 (PAD, UNK) are zeros and are left out.
    """
    rms = float(embedding[2:].float().pow(2).mean().sqrt()) if embedding.shape[0] > 2 else 0.0
    return round(TARGET_INPUT_RMS / rms, 4) if rms > 0 else 1.0


def model_embedding(cfg: RunConfig, task: TaskData) -> torch.Tensor:
    """The frozen word vectors as the model sees them (`model.input_norm`); PAD and UNK stay zero.

    Statistics are weighted by train-token counts (what the network actually reads) of the words only:
    an n-gram's row is the mean of its words' rows, and the same affine map keeps it their mean, so word
    rows read the same with or without n-grams (`data.ngrams`). "standardize"
    centres and scales each dimension: word2vec trained on IMDB has a large component shared by all
    words, so mean-pooled reviews are nearly parallel and the hard-sigmoid units see almost no
    review-to-review variation. "whiten" (ZCA) also decorrelates the dimensions: every direction of
    the token distribution gets unit variance, so the informative low-variance directions of
    correlated 300-d vectors are not drowned by a few dominant ones (a linear probe is unchanged).
    """
    emb = task.embedding.float()
    if cfg.model.input_norm == "none":
        return emb
    counts = torch.bincount(task.train.ids.flatten().long(), minlength=emb.shape[0])[: emb.shape[0]].float()
    counts[:2] = 0  # PAD, UNK
    counts[word_ids(task):] = 0  # n-grams
    w = counts / counts.sum().clamp(min=1)
    mean = w @ emb
    centred = emb - mean
    if cfg.model.input_norm == "whiten":
        cov = (centred * w[:, None]).t().double() @ centred.double()
        evals, evecs = torch.linalg.eigh(cov)
        scale = evals.clamp(min=evals.max() * WHITEN_FLOOR).rsqrt()
        out = (centred.double() @ (evecs * scale) @ evecs.t()).float()
    else:
        out = centred / (w @ centred.pow(2)).sqrt().clamp(min=1e-6)
    out[:2] = 0
    return out


def load_run_data(run_dir: str | Path, progress: bool = True, which: str = BEST) -> tuple[RunConfig, TaskData,
                                                                                        torch.Tensor]:
    """A run directory's config, its data set and the model's view of the word vectors: the frozen vectors as
    normalised for the model, or, for a run that learned them, the table of its checkpoint `which`.

    The one way every consumer of a trained run (evaluate, spiking conversion, comparison reports)
    gets exactly the inputs the model was trained on.
    """
    from analog_ep.train.checkpoint import load_checkpoint
    from analog_ep.train.run_dir import load_run_config

    cfg = load_run_config(run_dir)
    task = load_task_for(cfg, progress)
    if cfg.model.learn_embeddings:
        return cfg, task, load_checkpoint(run_dir, which)["model"]["embedding"].float()
    return cfg, task, model_embedding(cfg, task)


def ep_config(cfg: RunConfig, precision: str | None = None, fold: bool = False) -> EPConfig:
    """`precision`: the mode the run resolved `ep.precision` to (`resolve_precision`); default `ep.precision`.
    `fold`: what the run resolved `ep.fold_keys` to (`folded.resolve_fold`)."""
    return EPConfig(cfg.ep.beta, cfg.ep.free_steps, cfg.ep.nudge_steps, cfg.ep.tol,
                    precision=precision or cfg.ep.precision, fold=fold,
                    beta_sign=training_beta_sign(cfg.ep.estimator, cfg.ep.beta_sign))


def make_optimizer(cfg: RunConfig, net: EPNet) -> torch.optim.Optimizer:
    lrs = cfg.train.lrs[0] if len(cfg.train.lrs) == 1 else cfg.train.lrs
    try:
        groups = layer_param_groups(net, lrs, cfg.train.weight_decay, cfg.train.embedding_lr)
    except ValueError as err:
        raise ConfigError(f"train.lrs: {err}") from err
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups)
    # "adam" is fused: one pass over each parameter instead of ~10 (0.1 s instead of ~0.5 s per batch for the
    # paper's 180 M-weight IMDB model on 2 cores; CPU and CUDA builds have it). Its rounding differs from
    # torch's per-tensor loop, which "adam_unfused" keeps (same accuracy to the digits reported)
    fused = cfg.train.optimizer == "adam" and all(p.device.type in ("cpu", "cuda") for p in net.parameters())
    return torch.optim.Adam(groups, fused=fused or None)


def seeded_subset(size: int, limit: int | None, seed: int = 0) -> torch.Tensor:
    """Indices of a seeded random `limit` of `size` samples, in stored order (all of them without a limit).

    Never "the first N": the stored IMDB/SNLI splits are sorted by label, so those would be one class."""
    n = size if limit is None else min(limit, size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def batches(dataset, embedding: torch.Tensor | None, batch_size: int, device, dtype,
            order: torch.Tensor | None = None, start: int = 0, features: PairFeatures = NO_PAIR_FEATURES,
            shard: bool = False):
    """(x, y) batches embedded on the fly: x (B, S, L, d) on `device`; never the whole split as floats.

    `embedding` None: x is the batch's token ids (B, S, L), for a net that looks its learned vectors up itself.
    `features` (`data.pair_features`) appends the sentence-pair channels (`embedding.PairFeatures`).
    `shard`: this rank's part of each batch of `batch_size` (data parallelism; the whole batch in one process).
    """
    n = len(dataset)
    index = order if order is not None else torch.arange(n)
    for i in range(start * batch_size, n, batch_size):
        idx = distributed.shard(index[i:i + batch_size]) if shard else index[i:i + batch_size]
        ids = dataset.ids[idx].to(device)
        x = ids if embedding is None else embed_batch(ids, embedding, features).to(dtype)
        yield x, dataset.labels[idx].to(device)


def drop_words(ids: torch.Tensor, rate: float) -> torch.Tensor:
    """Training-time word dropout: each token becomes padding with probability `rate` (torch's global generator,
    seeded and checkpointed by the trainer). It changes only the inputs, so every estimator stays exact."""
    if rate <= 0:
        return ids
    return ids.masked_fill(torch.rand(ids.shape, device=ids.device) < rate, PAD_ID)


@torch.no_grad()
def evaluate_split(net: EPNet, dataset, embedding: torch.Tensor, cfg: RunConfig, progress: bool = False,
                   desc: str = "eval") -> dict:
    """Accuracy of the free-phase prediction on a whole split, plus the mean final residual. The free phase folds
    the first synapse onto the keys where `ep.fold_keys` says it pays (the same fixed points, sooner).

    Under data parallelism each rank evaluates its contiguous run of whole batches of the split and all get the
    whole split's numbers and predictions (in its order)."""
    dataset = distributed.shard_dataset(dataset, cfg.train.eval_batch_size)
    steps = cfg.ep.eval_free_steps or cfg.ep.free_steps
    dtype = net.weights[0].dtype
    precision = "fp32" if dtype == torch.float32 else str(dtype).removeprefix("torch.")  # the exact path's
    fold, _ = resolve_fold(cfg.ep.fold_keys, net.spec, precision, None, cfg.train.eval_batch_size,
                           str(net.weights[0].device))
    correct, total, residual, start = 0, 0, 0.0, time.perf_counter()
    predictions = []
    it = batches(dataset, embedding, cfg.train.eval_batch_size, net.weights[0].device, dtype,
                 features=cfg.data.pair_features)
    n_batches = math.ceil(len(dataset) / cfg.train.eval_batch_size)
    for x, y in tqdm(it, total=n_batches, desc=desc, disable=not progress, leave=False, file=sys.stderr):
        state, trace = free_phase(net, net.prepare(x, fold=fold), steps, tol=cfg.ep.eval_tol, track=True)
        pred = state[-1].argmax(-1)
        predictions.append(pred.cpu())
        correct += int((pred == y).sum())
        total += len(y)
        residual = max(residual, trace.final_residual)
    correct, total, residual, predictions = distributed.gather_evaluation(correct, total, residual, predictions)
    return {"accuracy": correct / max(total, 1), "n": total, "seconds": time.perf_counter() - start,
            "max_final_residual": residual, "predictions": torch.cat(predictions) if predictions else None}


# what a resumed run may be given anew: more epochs or time, other checkpoint intervals (nothing it learns)
RESUMABLE_CHANGES = ("train.epochs", "train.max_minutes", "train.checkpoint_minutes", "train.checkpoint_every")


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 command: str = "") -> None:
        self.world = distributed.current()  # rank 0 of 1 without torchrun
        self.cfg, self.progress = cfg, progress and self.world.is_main
        self.run = distributed.run_dir_class(self.world)(Path(run_dir), resume=resume)  # only rank 0 writes it
        self.run_dir, self.ckpt_dir, self.metrics_path = self.run.path, self.run.checkpoints, self.run.metrics
        self.resume, self.command = resume, command
        self._convergence_warned = False  # the non-convergence warning is given once a run

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("train.device = cuda but no CUDA device is visible; use --device cpu")
        distributed.refuse_unsupported(cfg.ep.estimator, self.world)
        seed_everything(cfg.train.seed)
        with distributed.main_first():  # rank 0 fills the data cache, the others read it
            self.task = load_task_for(cfg, self.progress)
        self.net = build_model(cfg, self.task)
        # evaluation reads the model's vectors: the frozen ones, or the learned table itself (live, as it trains)
        self.embedding = (self.net.embedding.detach() if self.net.embedding is not None
                          else model_embedding(cfg, self.task).to(cfg.train.device))
        self.initial_vectors = self.embedding.clone() if cfg.train.embedding_decay else None
        distributed.broadcast_parameters(self.net)
        self.precision, self.precision_reason = distributed.from_main(self._resolve_precision)  # one calibration
        self.fold, self.fold_reason = resolve_fold(cfg.ep.fold_keys, self.net.spec, self.precision, cfg.ep.estimator,
                                                   cfg.train.batch_size, cfg.train.device)
        self.processes = distributed.describe(cfg.train.device)
        if self.progress:
            print(f"ep.precision {cfg.ep.precision} -> {self.precision_reason}", file=sys.stderr)
            print(f"ep.fold_keys {cfg.ep.fold_keys} -> {self.fold_reason}", file=sys.stderr)
        if self.precision != "fp32":
            enable_compiled_kernels(True)  # the fast path's fused softmax and quantisers (compiled on first use)
            if cfg.train.device == "cpu":
                keep_freed_memory()  # its per-step tensors of tens of MB reuse the heap instead of faulting pages in
        elif cfg.train.device == "cpu":
            enable_fused_fp32()  # the exact path's retrieval of few queries in one pass (AVX2; nothing compiled)
        self.optimizer = make_optimizer(cfg, self.net)
        self.batches_per_epoch = math.ceil(len(self.task.train) / cfg.train.batch_size)
        total = max(cfg.train.epochs * self.batches_per_epoch, 1)
        if cfg.train.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=total, eta_min=min(cfg.train.min_lr, min(cfg.train.lrs)))
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.state = Progress()
        self.health = LearningMonitor(self.task.num_classes, cfg.ep.estimator)
        self._t0 = self._epoch_t0 = time.perf_counter()  # where this process's seconds are counted from
        self.run.start()  # the directory's lock, held until `close`
        if self.resume:
            self._load_last()
        self.run.write_json("config.json", {"config": self.cfg.to_dict(), "command": self.command,
                                            "data_info": self.task.info, "spec": self.net.spec.to_dict(),
                                            "int8_kernel": int8_kernel_name() if self.precision == "int8"
                                            else None, **self._precision_record(), **self.processes})

    def _resolve_precision(self) -> tuple[str, str]:
        """The mode this run computes in (`resolve_precision`), resolved once; a resumed "auto" run keeps the mode it
        started with, so that its numbers do not hang on a new calibration."""
        first = self.run_dir / "config.json"
        if self.resume and self.cfg.ep.precision == "auto" and first.is_file():
            started = json.loads(first.read_text(encoding="utf-8"))
            if started.get("precision"):
                return started["precision"], started["precision_reason"]
        if self.net.embedding is not None:
            if self.cfg.ep.precision not in ("auto", "fp32"):
                raise ConfigError(f"ep.precision = {self.cfg.ep.precision} with model.learn_embeddings: learned word "
                                  "vectors train on the exact path; use ep.precision=fp32 (or auto)")
            return "fp32", "fp32: learned word vectors (their EP contrast runs on the exact path)"
        return resolve_precision(self.cfg.ep.precision, self.net.spec, self.cfg.train.device, self.cfg.ep.fold_keys)

    def _precision_record(self) -> dict[str, str | bool]:
        return {"precision": self.precision, "precision_reason": self.precision_reason, "fold_keys": self.fold,
                "fold_keys_reason": self.fold_reason}

    def close(self) -> None:
        """Give the run directory's lock back."""
        self.run.close()

    def _load_last(self) -> None:
        ckpt, self.state = self.run.load_last()
        # the saved config read as today's: keys added since it was written take their defaults, not a "change"
        saved = RunConfig.from_dict(ckpt.get("config") or {}, source=str(self.ckpt_dir / "last.pt")).to_dict()
        refuse_changes(self.run_dir, saved, self.cfg.to_dict(), RESUMABLE_CHANGES,
                       may_change="train.epochs, train.max_minutes and the checkpoint intervals")
        self.net.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        self.run.continue_metrics(ckpt)

    def _save_last(self) -> None:
        self._keep_time()
        self.run.save_last(self.net, self.state, config=self.cfg.to_dict(), optimizer=self.optimizer.state_dict(),
                           scheduler=self.scheduler.state_dict())

    # ------------------------------------------------------------------ loop
    def _estimator(self) -> Estimator:
        name = self.cfg.ep.estimator
        refuse_untrainable(name)
        lrs = param_lrs(self.optimizer, self.net) if ESTIMATORS[name].needs_lrs else None
        estimator = make_estimator(name, ep_config(self.cfg, self.precision, self.fold), lrs=lrs)
        return distributed.allow_empty_shard(estimator)

    def _before_step(self, x: torch.Tensor, rows: int):
        """What runs between the estimate and the optimiser step: the ranks' gradients averaged, then the learned
        vectors' pull towards their initial values on the rows this batch read (`train.embedding_decay`)."""
        average = distributed.grad_averager(self.net, rows)
        decay = self.cfg.train.embedding_decay
        if not decay or self.net.embedding is None:
            return average

        def step() -> None:
            if average is not None:
                average()
            table, grad = self.net.embedding, self.net.embedding.grad
            if grad is None:  # C-EP moved the weights itself
                return
            used = torch.zeros(table.shape[0], device=table.device)
            used[x.reshape(-1).long()] = 1
            if self.world.active:  # the rows of the global batch, so that every rank moves the same rows
                torch.distributed.all_reduce(used, op=torch.distributed.ReduceOp.MAX)
            used[PAD_ID] = 0
            grad.addcmul_(used.unsqueeze(1), table.detach() - self.initial_vectors, value=decay)
        return step

    def _out_of_time(self) -> bool:
        limit = self.cfg.train.max_minutes
        return limit is not None and self.state.elapsed + time.perf_counter() - self._t0 > 60 * limit

    def _checkpoint_due(self, last_ckpt: float) -> bool:
        every = self.cfg.train.checkpoint_every
        return (time.perf_counter() - last_ckpt > 60 * self.cfg.train.checkpoint_minutes
                or every is not None and self.state.step % every == 0)

    def train(self, stop: StopRequest | None = None) -> None:
        """Epochs from where `self.state` stands; `stop` (a signal asked to stop) is checked between batches."""
        cfg, st = self.cfg, self.state
        stop = distributed.agreed(stop or StopRequest())  # all ranks stop before the same batch
        dtype = self.net.weights[0].dtype
        self._t0 = last_ckpt = time.perf_counter()
        out_of_time = False
        while st.epoch < cfg.train.epochs and not out_of_time:
            order = torch.randperm(len(self.task.train), generator=torch.Generator().manual_seed(
                cfg.train.seed * 1000 + st.epoch))
            self._epoch_t0, tally = time.perf_counter(), st.tally
            bar = tqdm(total=self.batches_per_epoch, initial=st.batch, desc=f"epoch {st.epoch + 1}/{cfg.train.epochs}",
                       disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
            learned = self.net.embedding is not None
            for x, y in batches(self.task.train, None if learned else self.embedding, cfg.train.batch_size,
                                cfg.train.device, dtype, order, start=st.batch, features=cfg.data.pair_features,
                                shard=True):
                stop.check()
                b0 = time.perf_counter()
                if learned:
                    x = drop_words(x, cfg.train.word_dropout)
                est = train_step(self.net, self._estimator(), x, y, self.optimizer,
                                 before_step=self._before_step(x, len(y)))
                self.scheduler.step()
                if not all(torch.isfinite(p).all() for p in self.net.parameters()):
                    raise FloatingPointError(f"non-finite weights at epoch {st.epoch + 1} batch {st.batch}: lower "
                                             "the learning rates or β (try --set train.lrs=[...])")
                batch = distributed.batch_numbers(est, y)  # the global batch's (this one's in one process)
                tally.add_counts(batch.n, batch.correct, batch.loss_sum, residual=batch.residual)
                self.health.add_batch(est.output, y, est.loss)
                st.batch += 1
                st.step += 1
                bar.update(1)
                bar.set_postfix(acc=f"{tally.accuracy:.3f}", loss=f"{tally.loss:.3f}",
                                res=f"{batch.residual:.1e}")
                if st.step % cfg.train.log_every == 0:
                    self.run.log({
                        "kind": "step", "step": st.step, "epoch": st.epoch + st.batch / self.batches_per_epoch,
                        "loss": batch.loss, "batch_accuracy": batch.accuracy,
                        "free_residual": batch.residual, "free_steps": batch.free_steps,
                        "seconds_per_batch": time.perf_counter() - b0, "lr": self.optimizer.param_groups[0]["lr"]})
                if self._checkpoint_due(last_ckpt):
                    self._save_last()
                    last_ckpt = time.perf_counter()
                if distributed.any_rank(self._out_of_time()):
                    out_of_time = True
                    break
            bar.close()
            epoch_done = st.batch >= self.batches_per_epoch
            val = evaluate_split(self.net, self.task.val, self.embedding, cfg, self.progress, desc="val")
            row = {"kind": "epoch", "epoch": st.epoch + (1 if epoch_done else st.batch / self.batches_per_epoch),
                   "train_accuracy": tally.accuracy, "train_loss": tally.loss,
                   "val_accuracy": val["accuracy"], "max_free_residual": tally.max_residual,
                   "epoch_seconds": tally.seconds + time.perf_counter() - self._epoch_t0,
                   "val_seconds": val["seconds"], "elapsed_minutes": (st.elapsed + time.perf_counter() - self._t0) / 60}
            self.run.log(row)
            if (warning := self.health.epoch_end()) is not None:  # never train to chance silently
                self.run.log({"kind": "warning", "epoch": row["epoch"], "message": warning})
                if self.world.is_main:
                    print(f"WARNING: {warning}", file=sys.stderr)
            warning = not_converged(tally.max_residual, self.cfg.ep.free_steps)
            if warning is not None and not self._convergence_warned:
                self._convergence_warned = True
                self.run.log({"kind": "warning", "epoch": row["epoch"], "message": warning})
                if self.world.is_main:
                    print(f"WARNING: {warning}", file=sys.stderr)
            if self.progress:
                print(f"epoch {row['epoch']:.2f}: train acc {row['train_accuracy']:.4f}  val acc "
                      f"{val['accuracy']:.4f}  ({row['epoch_seconds']:.0f} s)", file=sys.stderr)
            if val["accuracy"] > st.best_val:
                st.best_val, st.best_epoch = val["accuracy"], st.epoch + 1
                self.run.save_checkpoint(BEST, self.net, config=self.cfg.to_dict(), epoch=st.epoch + 1,
                                         val_accuracy=val["accuracy"])
            if epoch_done:
                st.epoch, st.batch = st.epoch + 1, 0
            st.tally = EpochTally()  # a partial epoch (out of time) is reported; its resumed rest starts afresh
            self._epoch_t0 = time.perf_counter()
            self._save_last()
            last_ckpt = time.perf_counter()
        stop.check()  # a stop asked for during the last validation: last.pt holds the finished training

    def _keep_time(self) -> None:
        """Move this process's training seconds into the state that `last.pt` saves."""
        now = time.perf_counter()
        self.state.elapsed += now - self._t0
        self.state.tally.seconds += now - self._epoch_t0
        self._t0 = self._epoch_t0 = now

    # ------------------------------------------------------------------ finish
    def finish(self, status: str = "completed") -> dict:
        from analog_ep.train.checkpoint import load_model
        from analog_ep.train.plots import plot_run

        cfg = self.cfg
        distributed.barrier()  # rank 0 has written best.pt
        best, _ = load_model(self.run_dir, BEST, device=cfg.train.device)
        best = best.to(getattr(torch, cfg.train.dtype))
        vectors = best.embedding.detach() if best.embedding is not None else self.embedding
        val = evaluate_split(best, self.task.val, vectors, cfg, self.progress, desc="val (best)")
        test = evaluate_split(best, self.task.test, vectors, cfg, self.progress, desc="test")
        x, _ = next(batches(self.task.val, vectors, 64, cfg.train.device, best.weights[0].dtype,
                            features=cfg.data.pair_features))
        _, trace = free_phase(best, best.prepare(x), max(cfg.ep.free_steps, cfg.ep.eval_free_steps or 0),
                              record_phi=True)
        report = {
            "status": status, "task": cfg.data.task, "estimator": cfg.ep.estimator,
            "test_accuracy": test["accuracy"], "val_accuracy": val["accuracy"], "best_epoch": self.state.best_epoch,
            "epochs_completed": self.state.epoch + self.state.batch / self.batches_per_epoch,
            "train_minutes": self.state.elapsed / 60, "test_eval_seconds": test["seconds"],
            "n_train": len(self.task.train), "n_val": val["n"], "n_test": test["n"],
            "data": self.task.info, "seed": cfg.train.seed, "device": cfg.train.device, "dtype": cfg.train.dtype,
            "software": software_versions(), "command": self.command,
            "free_phase_trace": {"residuals": trace.residuals, "phi": trace.phi},
            "parameters": sum(p.numel() for p in best.parameters()), **self._precision_record(), **self.processes,
        }
        self.run.write_json("report.json", report)
        if self.world.is_main:
            plot_run(self.run_dir)
        return report


def train_run(cfg: RunConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
              command: str = "") -> dict:
    """Train (or resume) a run and write its report.

    Ctrl-C or SIGTERM: the batch in progress is finished, `last.pt` saved, the resume command printed,
    and `Interrupted` raised (its `exit_code` 128 + the signal). After Ctrl-C a run with a best checkpoint
    still writes its report (status "interrupted"); after SIGTERM, which comes with a deadline, it does not.

    Started by torchrun: data-parallel, one process per device (`analog_ep.train.distributed`, docs/scaling.md).
    """
    with distributed.session(cfg.train.device):
        return _train_run(cfg, run_dir, resume, progress, command)


def _train_run(cfg: RunConfig, run_dir: str | Path, resume: bool, progress: bool, command: str) -> dict:
    trainer = Trainer(cfg, run_dir, resume, progress, command)
    try:
        trainer.setup()
        try:
            with stop_between_batches() as stop:
                trainer.train(stop)
        except Interrupted as stopped:
            trainer._save_last()
            if trainer.world.is_main:
                print(f"\n{trainer.run.interrupted_message(trainer.state)}", file=sys.stderr)
            if stopped.signum == signal.SIGINT and (trainer.ckpt_dir / BEST).exists():
                trainer.finish(status="interrupted")
            raise
        except KeyboardInterrupt:
            print(f"\nstopped in the middle of a batch: it was not saved; `{trainer.run.resume_command}` continues "
                  f"from the last checkpoint ({trainer.run.last})", file=sys.stderr)
            raise
        return trainer.finish()
    finally:
        trainer.close()
