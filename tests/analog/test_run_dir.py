"""The run-directory lifecycle both trainers share: open / resume / refuse, last.pt and metrics, the lock, signals."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analog_ep.errors import ConfigError
from analog_ep.phi import EPNet, GraphSpec
from analog_ep.train import run_lock
from analog_ep.train.lifecycle import NothingToResume, Progress, RunDir, config_differences, refuse_changes
from analog_ep.train.stop_signals import Interrupted, stop_between_batches


def tiny() -> EPNet:
    return EPNet(GraphSpec(num_streams=1, seq_len=2, dim=3, layers=(4, 2)), seed=0)


def test_resume_needs_a_checkpoint_and_says_how_to_start_over(tmp_path):
    with pytest.raises(NothingToResume, match="no run was started there.*without --resume"):
        RunDir(tmp_path / "never", resume=True)
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text("{}")  # stopped while loading data: config written, no last.pt
    with pytest.raises(NothingToResume, match="stopped before its first checkpoint, so nothing was saved yet"):
        RunDir(started, resume=True)
    assert issubclass(NothingToResume, ConfigError)  # the CLI prints it and exits 2


def test_a_new_run_refuses_a_directory_that_holds_one(tmp_path):
    run = RunDir(tmp_path)
    run.start()
    run.save_last(tiny(), Progress())
    run.close()
    with pytest.raises(ConfigError, match=r"already holds a run: add --resume .*seqep train --out .* --resume"):
        RunDir(tmp_path)
    RunDir(tmp_path, overwrite=True)  # the spiking entry points check first, then overwrite
    RunDir(tmp_path, resume=True)


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    """Rows logged after last.pt (a killed process's) are dropped: the resumed run logs them again."""
    run = RunDir(tmp_path)
    run.start()
    run.log({"kind": "step", "step": 1})
    state = Progress(step=1, batch=1)
    state.tally.add(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1, 1]), loss=0.5, residual=0.25)
    run.save_last(tiny(), state)
    run.log({"kind": "step", "step": 2})
    with open(run.metrics, "a") as f:
        f.write('{"kind": "step", "st')  # a line cut by the kill
    run.close()
    resumed = RunDir(tmp_path, resume=True)
    ckpt, progress = resumed.load_last()
    assert len(resumed.metrics.read_text().splitlines()) == 3  # nothing changed before the trainer accepts it
    resumed.continue_metrics(ckpt)
    assert [json.loads(line) for line in resumed.metrics.read_text().splitlines()] == [{"kind": "step", "step": 1}]
    assert (progress.step, progress.batch, progress.tally.seen, progress.tally.correct) == (1, 1, 2, 1)
    assert (progress.tally.loss, progress.tally.max_residual) == (0.5, 0.25)


def test_old_spiking_progress_loads():
    """A spiking last.pt from before epochs could be resumed half-way: "seconds", no batch, no tally."""
    old = {"epoch": 2, "step": 12, "best_val": 0.9, "best_epoch": 1, "seconds": 3.5, "before": {"a": 1}, "curve": []}
    progress = Progress.from_dict(old)
    assert (progress.epoch, progress.batch, progress.elapsed, progress.tally.seen, progress.before) == (
        2, 0, 3.5, 0, {"a": 1})
    assert Progress.from_dict(progress.to_dict()) == progress


def test_changed_config_names_every_key_and_what_may_change(tmp_path):
    saved = {"ep": {"beta": 0.1, "free_steps": 20}, "train": {"epochs": 2, "lrs": [1e-3]}}
    now = {"ep": {"beta": 0.2, "free_steps": 20}, "train": {"epochs": 5, "lrs": [1e-3, 5e-4]}}
    assert [d[0] for d in config_differences(saved, now, ["train.epochs"])] == ["ep.beta", "train.lrs"]
    with pytest.raises(ConfigError) as err:
        refuse_changes(tmp_path, saved, now, ["train.epochs"])
    message = str(err.value)
    assert "ep.beta=0.2: the run was trained with ep.beta=0.1" in message
    assert "train.lrs=[0.001, 0.0005]: the run was trained with train.lrs=[0.001]" in message
    assert "only train.epochs may change" in message and "new --out" in message
    refuse_changes(tmp_path, saved, {**now, "ep": saved["ep"], "train": {**now["train"], "lrs": [1e-3]}},
                   ["train.epochs"])  # more epochs only: accepted


def test_a_live_process_holding_the_lock_is_named_and_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                                "start": run_lock._start_time(holder.pid)}))
        pattern = rf"being written by process {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(run_lock.RunLocked, match=pattern):
            RunDir(tmp_path, resume=False)
        with pytest.raises(run_lock.RunLocked, match=pattern):
            run_lock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    run_lock.acquire(tmp_path)  # its process is gone: the stale lock is taken over
    assert run_lock.read_owner(tmp_path)["pid"] == os.getpid()
    run_lock.acquire(tmp_path)  # re-entrant within a process
    run_lock.release(tmp_path)
    assert (tmp_path / run_lock.LOCK_NAME).exists()
    run_lock.release(tmp_path)
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """The recorded pid is alive but started at another time: another process now, so the lock is stale."""
    (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                            "start": "1"}))
    run_lock.acquire(tmp_path)
    assert run_lock.read_owner(tmp_path)["pid"] == os.getpid()
    run_lock.release(tmp_path)


def test_another_hosts_lock_is_not_judged_from_here(tmp_path):
    (tmp_path / run_lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": "1"}))
    with pytest.raises(run_lock.RunLocked, match=r"process 1 on host elsewhere.*delete .*run.lock"):
        run_lock.acquire(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_between_batches_and_a_second_one_at_once(signum):
    with stop_between_batches() as stop:
        stop.check()
        os.kill(os.getpid(), signum)  # the first: only asks
        with pytest.raises(Interrupted) as err:
            stop.check()
        assert err.value.exit_code == 128 + signum
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signum)  # the second: now
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back


def test_reports_name_the_commit_and_the_cpu_that_made_them():
    import re

    from analog_ep.train.run_dir import software_versions

    versions = software_versions()
    assert versions["processor"]
    commit = versions["commit"]
    if (Path(__file__).resolve().parents[2] / ".git").exists():  # a checkout: the commit is named
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
