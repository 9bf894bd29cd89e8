"""A real `seqep train` process killed mid-epoch (SIGKILL, or SIGTERM) and resumed ends exactly as an
uninterrupted run: the same weights to the bit, the same metrics.jsonl line for line (wall-clock fields aside),
the same test accuracy. And a second process pointed at a running run's --out is refused, naming the first."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from tests.processes import BATCHES_PER_EPOCH, last, metrics, seqep, step_rows, train_command, wait_for

pytestmark = [pytest.mark.realdata]
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(train_command(run), check=True, capture_output=True, timeout=400)
    return run


def kill_and_resume(run: Path, signum: int, after_step: int) -> dict:
    """Start `seqep train`, send `signum` once it has logged `after_step` steps, resume; what happened."""
    proc = subprocess.Popen(train_command(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: step_rows(run) >= after_step, proc)
    rows_at_kill = step_rows(run)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    saved = last(run)["progress"]
    report = run / "report.json"
    status = json.loads(report.read_text())["status"] if report.exists() else None
    resumed = subprocess.run(seqep("train", "--out", str(run), "--resume", "--no-progress"), capture_output=True,
                             text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    return {"rc": proc.returncode, "stderr": err, "rows_at_kill": rows_at_kill, "saved": saved,
            "report_status": status}


def assert_same_run(a: Path, b: Path) -> None:
    last_a, last_b = last(a), last(b)
    for name, tensor in last_a["model"].items():
        assert torch.equal(tensor, last_b["model"][name]), name
    adam_a, adam_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert all(torch.equal(adam_a[i][k], adam_b[i][k]) for i in adam_a for k in ("step", "exp_avg", "exp_avg_sq"))
    assert metrics(a) == metrics(b)
    assert len(metrics(b)) == 2 * BATCHES_PER_EPOCH + 2  # one row per step and per epoch, none doubled
    report_a, report_b = (json.loads((r / "report.json").read_text()) for r in (a, b))
    for key in ("test_accuracy", "val_accuracy", "best_epoch"):
        assert report_a[key] == report_b[key], key


# after step 3: mid-epoch 1; after step 6: the end of epoch 1 (its last batch, validation or epoch-end
# checkpoint); after step 8: mid-epoch 2
@pytest.mark.parametrize("signum,after_step", [
    (signal.SIGKILL, 3), pytest.param(signal.SIGKILL, 6, marks=SLOW), pytest.param(signal.SIGKILL, 8, marks=SLOW),
    pytest.param(signal.SIGTERM, 6, marks=SLOW), (signal.SIGTERM, 8), pytest.param(signal.SIGINT, 8, marks=SLOW)])
def test_killed_mid_epoch_then_resumed_is_the_uninterrupted_run(straight, tmp_path, signum, after_step):
    run = tmp_path / "killed"
    what = kill_and_resume(run, signum, after_step)
    saved = what["saved"]
    assert saved["epoch"] * BATCHES_PER_EPOCH + saved["batch"] == saved["step"]
    if signum == signal.SIGKILL:
        assert what["rc"] == -signal.SIGKILL
        assert saved["step"] >= what["rows_at_kill"] - 1  # the last logged step's, or the one before (killed between)
    else:  # Ctrl-C and SIGTERM: the batch in progress is finished and saved, the resume command printed
        assert what["rc"] == 128 + signum, what["stderr"]
        assert f"continue with `seqep train --out {run} --resume`" in what["stderr"]
        assert saved["step"] >= what["rows_at_kill"]
    if signum == signal.SIGINT:  # Ctrl-C still reports the best model so far; SIGTERM comes with a deadline
        assert what["report_status"] == "interrupted"
    else:
        assert what["report_status"] is None
    assert not (run / "run.lock").exists() or signum == signal.SIGKILL
    print(f"{signal.Signals(signum).name} after {what['rows_at_kill']} logged steps; last.pt at step {saved['step']} "
          f"(epoch {saved['epoch'] + 1}, batch {saved['batch']})")
    assert_same_run(straight, run)
    assert json.loads((run / "report.json").read_text())["status"] == "completed"


def test_a_second_process_on_a_running_run_is_refused(tmp_path):
    run = tmp_path / "busy"
    # 50 epochs: still running when the second process comes, however fast the machine
    first = subprocess.Popen(train_command(run, "train.epochs=50"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for(lambda: (run / "checkpoints" / "last.pt").exists(), first)
        second = subprocess.run(seqep("train", "--out", str(run), "--resume", "--no-progress"), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        assert f"being written by process {first.pid} on host {socket.gethostname()}" in second.stderr
    finally:
        first.kill()
        first.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == first.pid  # SIGKILL leaves its lock behind...
    epochs = last(run)["progress"]["epoch"] + 1  # finish the epoch in progress, not all 50
    taken = subprocess.run(seqep("train", "--out", str(run), "--resume", "--epochs", str(epochs), "--no-progress"),
                           capture_output=True, text=True, timeout=400)
    assert taken.returncode == 0, taken.stderr  # ... which the next run takes over
    assert f"taking over the lock of process {first.pid}" in taken.stderr
    assert not (run / "run.lock").exists()


def test_killed_before_its_first_checkpoint_resume_says_nothing_was_saved(tmp_path):
    run = tmp_path / "early"
    # the first checkpoint comes at the end of a 63-batch epoch (none every step): a kill after the first logged
    # step lands before it however fast the machine
    early = ("data.train_limit=2000", "train.checkpoint_every=none", "train.epochs=50")
    proc = subprocess.Popen(train_command(run, *early), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: step_rows(run) >= 1, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert not (run / "checkpoints" / "last.pt").exists(), "killed too late for this test"
    resumed = subprocess.run(seqep("train", "--out", str(run), "--resume", "--no-progress"), capture_output=True,
                             text=True, timeout=120)
    assert resumed.returncode == 2, resumed.stderr
    assert f"nothing to resume in {run}" in resumed.stderr and "without --resume" in resumed.stderr
