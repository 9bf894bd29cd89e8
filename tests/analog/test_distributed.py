"""Data-parallel training (torch.distributed, gloo on the CPU) equals one process over the same global batch.

Two ranks are spawned as torchrun would start them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
environment), so the code under test finds its process group the way a real launch does.

Tolerance: the ranks' estimates are batch means over their shards, weighted by B_r / B and summed by the
all-reduce: the single-process sum in another order, with one more rounding for the weight, so not exact to
the bit. EP's contrast divides a difference of nearby states' ∂Φ/∂θ by β, which enlarges rounding: in float64
the gradients agree to 1e-12 relative (measured 4e-13 on the tiny network). Trained weights are compared at
1e-6 relative (Adam divides by √v, which can enlarge a rounding-level difference of a near-zero gradient; on
the tiny IMDB runs below they came out equal to the bit).
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, make_estimator
from analog_ep.train import distributed
from tests.helpers import random_inputs, tiny_net

WORLD = 2
RANK_TIMEOUT = 240  # seconds: a rank waiting longer is stuck (its stack is printed and it exits)
GRAD_RTOL = 1e-12
WEIGHT_RTOL = 1e-6
ESTIMATORS = ("ep_symmetric", "ep_two_phase", "bptt")
BATCHES = (5, 1)  # 5 samples: shards of 3 and 2 (unequal weights); 1 sample: rank 1's shard is empty


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, port: int, job: str, args: tuple) -> None:
    """One rank, with the environment torchrun would give it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(RANK_TIMEOUT, exit=True)  # a rank stuck in a collective fails the test
    globals()[job](rank, *args)
    faulthandler.cancel_dump_traceback_later()


def spawn(job: str, *args) -> None:
    """Run `job(rank, *args)` in WORLD fresh processes; a failing rank fails the test."""
    mp.start_processes(_rank_entry, args=(free_port(), job, args), nprocs=WORLD, join=True, start_method="spawn")


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-300))


# ---------------------------------------------------------------- gradients of one batch
def grads_of(net, estimator: str, x, y, average: bool) -> dict[str, torch.Tensor]:
    est = distributed.allow_empty_shard(make_estimator(estimator, EPConfig(free_steps=10, nudge_steps=4)))
    idx = distributed.shard(torch.arange(len(y)))
    net.zero_grad(set_to_none=True)
    est(net, x[idx], y[idx])
    if average:
        distributed.average_grads(net.parameters(), len(idx))
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def _grads_job(rank: int, out: str) -> None:
    with distributed.session("cpu") as world:
        assert (world.rank, world.size, world.backend) == (rank, WORLD, "gloo")
        net = tiny_net("imdb_pooled")
        x, y = random_inputs(net.spec, max(BATCHES))
        found = {(e, n): grads_of(net, e, x[:n], y[:n], average=True) for e in ESTIMATORS for n in BATCHES}
    torch.save(found, Path(out) / f"rank{rank}.pt")


def test_averaged_gradients_equal_the_global_batch_estimate(tmp_path):
    spawn("_grads_job", str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    net = tiny_net("imdb_pooled")
    x, y = random_inputs(net.spec, max(BATCHES))
    worst = 0.0
    for e in ESTIMATORS:
        for n in BATCHES:
            single = grads_of(net, e, x[:n], y[:n], average=False)
            for name, g in single.items():
                assert torch.equal(ranks[0][e, n][name], ranks[1][e, n][name]), (e, n, name)  # one step for all
                worst = max(worst, relative_difference(ranks[0][e, n][name], g))
                assert relative_difference(ranks[0][e, n][name], g) < GRAD_RTOL, (e, n, name)
    print(f"largest relative gradient difference, 2 ranks vs 1 process: {worst:.2e}")


# ---------------------------------------------------------------- helpers without a process group
def test_one_process_starts_no_group_and_shards_nothing(monkeypatch):
    for name in distributed.LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with distributed.session("cpu") as world:
        assert world == distributed.World() and not world.active and world.is_main
        assert not torch.distributed.is_initialized()
        indices = torch.arange(7)
        assert distributed.shard(indices) is indices
        assert distributed.sum_over_ranks(3, 4.5) == [3, 4.5]
        assert distributed.describe("cpu")["world_size"] == 1
        assert distributed.run_dir_class(world) is distributed.RunDir


def test_cep_is_refused_under_data_parallelism():
    distributed.refuse_unsupported("cep", distributed.World())  # one process: allowed
    with pytest.raises(ConfigError, match="updates the weights at each nudged step"):
        distributed.refuse_unsupported("cep", distributed.World(rank=0, size=2, backend="gloo"))


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            distributed._check_device("cuda", 0, 2)
        pytest.skip("no GPU: the NCCL path is not run here")
    with pytest.raises(ConfigError, match="same GPU"):
        distributed._check_device("cuda:0", 1, 2)


# ---------------------------------------------------------------- a whole run on real data
# IMDB with tiny limits in float64 on the exact path, no early exit (ep.tol would stop each shard's free phase
# at its own step): one epoch of a few steps, then the trainer's own validation and test evaluation
TINY = ["data.train_limit=160", "data.eval_limit=50", "data.max_len=32", "model.hidden=[8, 4]",
        "model.pool_queries=2", "ep.free_steps=10", "ep.nudge_steps=4", "ep.tol=none", "ep.precision=fp32",
        "train.dtype=float64", "train.epochs=1", "train.eval_batch_size=16", "train.log_every=1"]


def tiny_config(batch_size: int):
    from analog_ep.train.config import apply_overrides, load_preset

    return apply_overrides(load_preset("imdb", "smoke"), [*TINY, f"train.batch_size={batch_size}"])


def batch_size_with_a_lonely_last_sample(cfg) -> int:
    """A global batch size whose last batch holds one sample, so that rank 1's shard of it is empty."""
    from analog_ep.train.trainer import load_task_for

    n = len(load_task_for(cfg, progress=False).train)
    return next(b for b in range(24, n // 2) if n % b == 1)


def _train_job(rank: int, cfg_dict: dict, out: str, evaluate_run: str, evaluate_port: int) -> None:
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.config import RunConfig
    from analog_ep.train.trainer import evaluate_split, load_run_data, train_run

    cfg = RunConfig.from_dict(cfg_dict)
    train_run(cfg, out, progress=False)
    assert not torch.distributed.is_initialized()  # the run's group is torn down with it
    os.environ["MASTER_PORT"] = str(evaluate_port)  # a second group: a fresh rendezvous, not the closed one's port
    with distributed.session("cpu"):  # the one-process run's best model, evaluated by two ranks
        _, task, embedding = load_run_data(evaluate_run, progress=False)
        net, _ = load_model(evaluate_run)
        result = evaluate_split(net.to(torch.float64), task.test, embedding, cfg)
        torch.save(result, Path(out) / f"evaluated-rank{rank}.pt")


def _train_only_job(rank: int, cfg_dict: dict, out: str) -> None:
    from analog_ep.train.config import RunConfig
    from analog_ep.train.trainer import train_run

    train_run(RunConfig.from_dict(cfg_dict), out, progress=False)


@pytest.mark.realdata
def test_two_ranks_learn_the_word_vectors_of_one_process(tmp_path):
    """The learned table's gradient is averaged like any other; its pull towards the initial vectors reaches the
    rows of the global batch on every rank (each rank read only its shard's tokens)."""
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.config import apply_overrides
    from analog_ep.train.trainer import load_task_for, model_embedding, train_run

    cfg = apply_overrides(tiny_config(32), ["model.learn_embeddings=true", "train.embedding_decay=1e-3"])
    train_run(cfg, tmp_path / "one", progress=False)
    spawn("_train_only_job", cfg.to_dict(), str(tmp_path / "two"))
    a, _ = load_model(tmp_path / "one", "last.pt")
    b, _ = load_model(tmp_path / "two", "last.pt")
    start = model_embedding(cfg, load_task_for(cfg, progress=False)).to(torch.float64)
    assert (a.embedding.detach()[2:] != start[2:]).any()  # the table learned
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert relative_difference(pb.detach(), pa.detach()) < WEIGHT_RTOL, name


@pytest.mark.realdata
def test_two_ranks_train_the_one_process_model_and_record_it(tmp_path):
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.trainer import evaluate_split, load_run_data, train_run

    cfg = tiny_config(24)
    cfg = tiny_config(batch_size_with_a_lonely_last_sample(cfg))
    one = train_run(cfg, tmp_path / "one", progress=False)
    spawn("_train_job", cfg.to_dict(), str(tmp_path / "two"), str(tmp_path / "one"), free_port())

    a, _ = load_model(tmp_path / "one", "last.pt")
    b, _ = load_model(tmp_path / "two", "last.pt")
    worst = max(relative_difference(pb.detach(), pa.detach())
                for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()))
    print(f"largest relative weight difference after {one['epochs_completed']} epoch, 2 ranks vs 1: {worst:.2e}")
    assert worst < WEIGHT_RTOL

    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (two["test_accuracy"], two["val_accuracy"], two["n_test"]) == (
        one["test_accuracy"], one["val_accuracy"], one["n_test"])
    assert (two["world_size"], two["distributed_backend"], len(two["devices"])) == (2, "gloo", 2)
    assert (one["world_size"], one["distributed_backend"]) == (1, None)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert (config["world_size"], config["distributed_backend"]) == (2, "gloo")
    assert not (tmp_path / "two" / "run.lock").exists()

    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    first = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == [r["kind"] for r in first]  # rank 0 alone wrote them, once
    assert rows[-1]["train_accuracy"] == first[-1]["train_accuracy"]
    assert rows[-1]["train_loss"] == pytest.approx(first[-1]["train_loss"], rel=1e-9)

    _, task, embedding = load_run_data(tmp_path / "one", progress=False)
    net, _ = load_model(tmp_path / "one")
    alone = evaluate_split(net.to(torch.float64), task.test, embedding, cfg)
    for r in range(WORLD):
        shared = torch.load(tmp_path / "two" / f"evaluated-rank{r}.pt", weights_only=True)
        assert (shared["accuracy"], shared["n"]) == (alone["accuracy"], alone["n"])
        assert torch.equal(shared["predictions"], alone["predictions"])


def _resume_job(rank: int, cfg_dict: dict, longer_dict: dict, start: str, resume: str, resume_port: int) -> None:
    from analog_ep.train.config import RunConfig
    from analog_ep.train.trainer import train_run

    train_run(RunConfig.from_dict(cfg_dict), start, progress=False)  # a run started on 2 ranks
    os.environ["MASTER_PORT"] = str(resume_port)
    train_run(RunConfig.from_dict(longer_dict), resume, resume=True, progress=False)  # one from 1 process, resumed


@pytest.mark.realdata
def test_a_run_resumes_on_another_number_of_processes(tmp_path):
    """1 epoch on 2 ranks + 1 on one process, and 1 on one process + 1 on 2 ranks: both the 2-epoch run."""
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.trainer import train_run

    one_epoch = tiny_config(53)
    one_epoch.train.lr_schedule = "constant"  # a resume may add epochs; a cosine schedule keeps its first length
    two_epochs = tiny_config(53)
    two_epochs.train.lr_schedule, two_epochs.train.epochs = "constant", 2
    train_run(two_epochs, tmp_path / "straight", progress=False)
    train_run(one_epoch, tmp_path / "one-then-two", progress=False)
    spawn("_resume_job", one_epoch.to_dict(), two_epochs.to_dict(), str(tmp_path / "two-then-one"),
          str(tmp_path / "one-then-two"), free_port())
    train_run(two_epochs, tmp_path / "two-then-one", resume=True, progress=False)

    straight, _ = load_model(tmp_path / "straight", "last.pt")
    for run, processes_now in (("one-then-two", 2), ("two-then-one", 1)):
        resumed, _ = load_model(tmp_path / run, "last.pt")
        worst = max(relative_difference(pr.detach(), ps.detach())
                    for (_, ps), (_, pr) in zip(straight.named_parameters(), resumed.named_parameters()))
        print(f"{run}: largest relative weight difference to the straight run {worst:.2e}")
        assert worst < WEIGHT_RTOL, run
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["epochs_completed"] == 2 and report["world_size"] == processes_now


@pytest.mark.realdata
def test_torchrun_runs_the_cli_and_records_two_processes(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    out = tmp_path / "run"
    overrides = [a for o in [*TINY, "train.batch_size=32"] for a in ("--set", o)]
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analog_ep.cli", "train",
                           "--task", "imdb", "--preset", "smoke", *overrides, "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone prints the summary
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["distributed_backend"] == "gloo"


def test_cep_under_torchrun_is_a_clear_error(tmp_path):
    spawn("_cep_job", str(tmp_path))
    assert (tmp_path / "refused").read_text().startswith("ep.estimator = cep cannot train data-parallel")


def _cep_job(rank: int, out: str) -> None:
    from analog_ep.train.config import RunConfig, apply_overrides
    from analog_ep.train.trainer import train_run

    cfg = apply_overrides(RunConfig(), ["ep.estimator=cep"])
    try:
        train_run(cfg, Path(out) / "run", progress=False)
    except ConfigError as err:
        if rank == 0:
            (Path(out) / "refused").write_text(str(err))
        return
    raise AssertionError("C-EP was not refused")


def _torchrun_train(out: Path, *extra: str) -> list[str]:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    overrides = [a for o in [*TINY, "train.batch_size=32", "train.epochs=2", "train.checkpoint_every=1"]
                 for a in ("--set", o)]
    return [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analog_ep.cli", "train", "--task", "imdb",
            "--preset", "smoke", *overrides, "--out", str(out), "--no-progress", *extra]


@pytest.mark.realdata
@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(tmp_path):
    """SIGKILL to torchrun and both ranks mid-epoch, then `--resume` on 2 processes: the same final weights."""
    import signal
    import time

    from analog_ep.train.checkpoint import load_model
    from tests.processes import step_rows

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_torchrun_train(tmp_path / "straight"), capture_output=True, text=True, timeout=600,
                              env=env)
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_train(killed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own process group: torchrun and both ranks
    deadline = time.monotonic() + 300
    while step_rows(killed) < 3:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run did not get to step 3 in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert (killed / "checkpoints" / "last.pt").exists()
    resumed = subprocess.run(_torchrun_train(killed, "--resume"), capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, _ = load_model(tmp_path / "straight", "last.pt")
    b, _ = load_model(killed, "last.pt")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert json.loads((killed / "report.json").read_text())["world_size"] == 2


@pytest.mark.realdata
def test_evaluate_under_torchrun_gives_the_one_process_numbers(tmp_path, capsys):
    from analog_ep.cli import main
    from analog_ep.train.trainer import train_run

    run = tmp_path / "run"
    train_run(tiny_config(32), run, progress=False)
    assert main(["evaluate", str(run), "--split", "test", "--json", "--no-progress"]) == 0
    alone = json.loads(capsys.readouterr().out)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analog_ep.cli", "evaluate",
                           str(run), "--split", "test", "--json", "--no-progress"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout)  # rank 0 alone prints
    assert shared["world_size"] == 2 and alone["world_size"] == 1
    assert (shared["accuracy"], shared["n"]) == (alone["accuracy"], alone["n"])


# ---------------------------------------------------------------- user errors under torchrun
@pytest.mark.parametrize("setting, says", [
    ("ep.no_such_key=1", "unknown key ep.no_such_key"),  # met before any process group exists
    ("ep.estimator=cep", "cannot train data-parallel"),  # met inside the process group
], ids=["before-the-group", "inside-the-group"])
def test_a_user_error_under_torchrun_is_printed_once_and_the_launch_fails_with_its_status(tmp_path, setting, says):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "analog_ep.cli", "train",
                           "--task", "imdb", "--preset", "smoke", "--set", setting, "--out", str(tmp_path / "run"),
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count("seqep train: error:") == 1 and says in output, output[-3000:]
    assert "exitcode  : 2" in output  # torchrun's summary (it may stop the second rank itself once one has left)


def test_the_first_rank_of_a_node_prints_a_user_error_and_any_rank_its_own():
    shared, own = ConfigError("the same on every rank"), distributed.RankError("this rank's device")
    for env, prints_shared in (({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True),
                               ({"RANK": "1", "LOCAL_RANK": "1"}, False), ({"RANK": "8", "LOCAL_RANK": "0"}, True)):
        assert distributed.prints_user_errors(shared, env) == prints_shared, env
        assert distributed.prints_user_errors(own, env), env


def test_a_rank_without_a_gpu_says_so_itself(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.RankError, match="LOCAL_RANK 1 has no GPU"):
        distributed._check_device("cuda", 1, 2)
