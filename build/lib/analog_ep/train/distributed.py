"""Data-parallel training on torch.distributed: one process per device, launched by `torchrun`.

Every estimator except C-EP leaves on `.grad` the batch mean of per-sample local terms, so a global batch
split into shards gives the single-process estimate as the shards' estimates weighted by their sizes:
ĝ = Σ_r (B_r / B) ĝ_r. Each rank relaxes its shard of every global batch (`shard`, contiguous slices of the
run's seeded order), `average_grads` all-reduces the weighted estimates before the optimiser step, and every
rank then takes the same step on the same weights. Evaluation shards a split the same way and sums the counts.
PyTorch does all the communication (gloo on the CPU, NCCL on CUDA); without torchrun's environment nothing
here starts a process group and every helper is a no-op, so a single process runs exactly as before.

Only rank 0 writes the run directory and holds its lock (`FollowerRunDir` is what the other ranks see).
Decisions a rank takes alone (a stop signal, the time limit, the precision calibration) are agreed on by all
ranks, since a rank that leaves the loop alone leaves the others waiting in a collective.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from analog_ep.data.dataset import SequenceDataset
from analog_ep.dynamics import RelaxTrace
from analog_ep.errors import ConfigError
from analog_ep.estimators import ESTIMATORS, Estimate, Estimator
from analog_ep.phi import EPNet
from analog_ep.train.lifecycle import RunDir
from analog_ep.train.stop_signals import Interrupted, StopRequest

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # what torchrun sets in each process it starts
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; a single process is rank 0 of 1 with no backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """A process group is running (collectives are real)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """The rank that writes files, prints and holds the run lock."""
        return self.rank == 0


class RankError(ConfigError):
    """A user error of this process alone (its device, say), which the other ranks do not have: printed by the
    rank that has it (`prints_user_errors`)."""


def prints_user_errors(err: BaseException, env: dict[str, str] | None = None) -> bool:
    """Whether this process prints a user error. Under torchrun every rank reads the same command line and files
    and so meets the same error: the first rank of each node prints it (one message in each node's log; one
    process outside torchrun), the others leave with the same exit status in silence. An error of one rank alone
    (`RankError`) is printed by the rank that has it."""
    env = os.environ if env is None else env
    return isinstance(err, RankError) or int(env.get("LOCAL_RANK", "0")) == 0


def launched_by_torchrun(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return all(name in env for name in LAUNCH_VARIABLES)


def launch_rank(env: dict[str, str] | None = None) -> int:
    """The rank torchrun gave this process (0 outside torchrun); readable before and after the group exists."""
    env = os.environ if env is None else env
    return int(env.get("RANK", "0"))


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend())


def backend_for(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _check_device(device: str, local_rank: int, world_size: int) -> None:
    """Each rank takes `cuda:LOCAL_RANK`; an explicit `cuda:N` would put every rank of a node on one GPU."""
    kind = torch.device(device)
    if kind.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but no CUDA device is visible; use --device cpu")
    if kind.index is not None and world_size > 1:
        raise ConfigError(f"train.device = {device} under torchrun: every rank would use the same GPU. Use "
                          "--device cuda, and each rank takes cuda:LOCAL_RANK")
    if local_rank >= torch.cuda.device_count():
        raise RankError(f"rank with LOCAL_RANK {local_rank} has no GPU (this node shows "
                          f"{torch.cuda.device_count()}): start at most that many processes per node "
                          "(torchrun --nproc_per_node)")
    torch.cuda.set_device(local_rank)


@contextmanager
def session(device: str) -> Iterator[World]:
    """A process group for the duration of a run when torchrun started this process, else nothing at all.

    The backend follows `device` (gloo for the CPU, NCCL for CUDA); rendezvous comes from torchrun's
    environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE). A group that already exists is used as is.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    if not dist.is_available():
        raise ConfigError("torchrun started this process, but this torch build has no torch.distributed")
    _check_device(device, int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend_for(device), init_method="env://")
    try:
        yield current()
        dist.barrier()  # leave together: rank 0 may still be writing the report when the others are done
    finally:
        dist.destroy_process_group()


def refuse_unsupported(estimator: str, world: World) -> None:
    """An estimator that moves the weights itself (C-EP, at every nudged step, from its own batch) would let the
    ranks diverge after one step; agreeing would take an all-reduce of every weight at every nudged step."""
    entry = ESTIMATORS.get(estimator)
    if world.size > 1 and entry is not None and entry.needs_lrs:
        raise ConfigError(f"ep.estimator = {estimator} cannot train data-parallel ({world.size} processes): it "
                          "updates the weights at each nudged step from its own batch (as C-EP does), so every "
                          "step would need an all-reduce of all weights. Train it in one process (without "
                          "torchrun), or use ep_symmetric, whose update is one average per batch")


# ---------------------------------------------------------------- collectives (no-ops in one process)
def _device(world: World) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else torch.device("cpu")


def barrier() -> None:
    world = current()
    if world.active:
        dist.barrier()


def sum_over_ranks(*values: float) -> list[float]:
    """Each value summed over the ranks (float64 on the wire, so counts stay exact)."""
    if not current().active:
        return list(values)
    return sum_tensor_over_ranks(torch.tensor(values, dtype=torch.float64)).tolist()


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t` summed element-wise over the ranks, in float64 (counts stay exact), on `t`'s device; a new tensor."""
    world = current()
    total = t.to(dtype=torch.float64, device=_device(world) if world.active else t.device, copy=True)
    if world.active:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(t.device)


def max_over_ranks(value: float) -> float:
    world = current()
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device(world))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (so that all ranks leave a loop at the same batch)."""
    return max_over_ranks(float(flag)) > 0


def from_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 only and its (picklable) result given to every rank: one answer for choices
    that could come out differently per rank (a timed calibration) or write a shared file."""
    world = current()
    if not world.active:
        return decide()
    box = [decide() if world.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_device(world))
    return box[0]


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block before the others do (it fills a cache they then read instead of rebuilding)."""
    world = current()
    if world.active and not world.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if world.active and world.is_main:
            dist.barrier()


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Rank 0's weights and buffers on every rank (in place), so that all start from the same model."""
    if not current().active:
        return
    for tensor in module.state_dict().values():
        dist.broadcast(tensor, src=0)


def shard_bounds(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous part of n items: sizes differ by at most one (as
    `torch.tensor_split`), and a rank may get none when n is smaller than the number of ranks."""
    world = current()
    if not world.active:
        return 0, n
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return start, start + base + (world.rank < extra)


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `indices` (one global batch of the run's order): the whole of it in one process."""
    if not current().active:
        return indices
    start, stop = shard_bounds(len(indices))
    return indices[start:stop]


def whole_batches(n: int, batch_size: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous run of whole batches, when n items are cut into batches of
    `batch_size` from the start: each rank's batches are batches one process forms, so whatever a batch decides
    for all its samples (an early exit on its residual, a generator seeded per batch) comes out the same."""
    start, stop = shard_bounds(-(-n // batch_size))
    return min(start * batch_size, n), min(stop * batch_size, n)


def shard_dataset(dataset: SequenceDataset, batch_size: int | None = None) -> SequenceDataset:
    """This rank's contiguous part of an evaluation split (views, no copy); the split itself in one process.
    With `batch_size`, a run of whole batches (`whole_batches`): an early exit decided per batch then comes out
    as in one process."""
    start, stop = shard_bounds(len(dataset)) if batch_size is None else whole_batches(len(dataset), batch_size)
    if (start, stop) == (0, len(dataset)):
        return dataset
    return SequenceDataset(dataset.ids[start:stop], dataset.labels[start:stop], dataset.name)


def average_grads(params: Iterable[torch.nn.Parameter], local_n: int) -> None:
    """Replace each `.grad` (the mean over this rank's `local_n` samples) by the mean over the global batch:
    Σ_r (B_r / B) ĝ_r, the single-process estimate up to rounding. A rank without samples contributes zeros."""
    world = current()
    if not world.active:
        return
    (total,) = sum_over_ranks(local_n)
    weight = local_n / total if total else 0.0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.mul_(weight)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def grad_averager(net: torch.nn.Module, local_n: int) -> Callable[[], None] | None:
    """What `train_step` runs between the estimate and the optimiser step: `average_grads` over the ranks
    (None in one process: nothing to run)."""
    if not current().active:
        return None
    return lambda: average_grads(net.parameters(), local_n)


def allow_empty_shard(estimator: Estimator) -> Estimator:
    """`estimator`, except that a rank whose shard of a batch is empty (a last batch smaller than the number
    of ranks) estimates nothing: no `.grad`, which `average_grads` counts as zeros of weight 0."""
    if not current().active:
        return estimator

    def estimate(net: EPNet, x: torch.Tensor, labels: torch.Tensor) -> Estimate:
        if len(labels):
            return estimator(net, x, labels)
        output = torch.zeros(0, net.spec.num_classes, dtype=net.weights[0].dtype, device=x.device)
        return Estimate({}, output, 0.0, RelaxTrace())

    return estimate


def gather_in_rank_order(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' `rows` (1-d, any lengths), concatenated in rank order: a split's predictions in its order,
    since each rank evaluated a contiguous slice of it."""
    world = current()
    if not world.active:
        return rows
    device = _device(world)
    lengths = [int(n) for n in sum_over_ranks(*[len(rows) if r == world.rank else 0 for r in range(world.size)])]
    padded = torch.zeros(max(max(lengths), 1), dtype=rows.dtype, device=device)
    padded[:len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)]).to(rows.device)


def gather_evaluation(correct: int, total: int, residual: float, predictions: list[torch.Tensor]
                      ) -> tuple[int, int, float, list[torch.Tensor]]:
    """An evaluation's counts over the ranks' parts of a split, and its predictions in the split's order
    (one tensor); in one process, the arguments as they are."""
    if not current().active:
        return correct, total, residual, predictions
    correct, total = sum_over_ranks(correct, total)
    mine = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)
    return int(correct), int(total), max_over_ranks(residual), [gather_in_rank_order(mine)]


def describe(device: str) -> dict[str, Any]:
    """What config.json and report.json record of the processes: their number, backend and devices
    (collective: every rank calls it)."""
    world = current()
    where = f"cuda:{_cuda_index()}" if torch.device(device).type == "cuda" else device
    mine = f"{socket.gethostname()}:{where}"
    devices = [mine]
    if world.active:
        devices = [None] * world.size
        dist.all_gather_object(devices, mine)
    return {"world_size": world.size, "distributed_backend": world.backend, "devices": devices}


def _cuda_index() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------- the training loop's agreements
@dataclass
class AgreedStop(StopRequest):
    """A stop request that every rank sees at the same check: a signal reaching one rank (or reaching them
    between two different batches) stops all of them before the same batch."""

    local: StopRequest | None = None

    def check(self) -> None:
        signum = int(max_over_ranks(float(self.local.signum or 0))) if self.local is not None else 0
        if signum:
            raise Interrupted(signum)


def agreed(stop: StopRequest) -> StopRequest:
    return AgreedStop(local=stop) if current().active else stop


@dataclass
class BatchNumbers:
    """One training batch's numbers over all ranks: samples, correct predictions, summed loss, the largest
    final free-phase residual, the most free-phase steps; in one process, the estimate's own."""

    n: int
    correct: int
    loss_sum: float
    loss: float
    accuracy: float
    residual: float
    free_steps: int


def batch_numbers(est: Estimate, y: torch.Tensor) -> BatchNumbers:
    output, loss, residual, free_steps = est.output, est.loss, est.free_trace.final_residual, est.free_trace.steps
    correct = int((output.argmax(-1) == y).sum())
    if not current().active:
        accuracy = float((output.argmax(-1) == y).float().mean())
        return BatchNumbers(len(y), correct, loss * len(y), loss, accuracy, residual, free_steps)
    n, correct, loss_sum = sum_over_ranks(len(y), correct, loss * len(y))
    residual = max_over_ranks(residual if len(y) else float("-inf"))
    steps = int(max_over_ranks(free_steps))
    return BatchNumbers(int(n), int(correct), loss_sum, loss_sum / max(n, 1), correct / max(n, 1), residual, steps)


class FollowerRunDir(RunDir):
    """The run directory as a rank other than 0 sees it: read (last.pt, to resume), never written or locked.
    Rank 0's `RunDir` makes every check and every write."""

    def check(self) -> None:
        pass

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def log(self, row: dict[str, Any]) -> None:
        pass

    def write_json(self, name: str, obj: Any) -> None:
        pass

    def save_checkpoint(self, which: str, net: torch.nn.Module, **extra: Any) -> None:
        pass

    def save_last(self, net: torch.nn.Module, progress: Any, **extra: Any) -> None:
        pass

    def continue_metrics(self, ckpt: dict[str, Any]) -> None:
        pass


def run_dir_class(world: World) -> type[RunDir]:
    return RunDir if world.is_main else FollowerRunDir
