"""Spiking runs in real processes: `seqep train --backend spiking --init RUN` on a tiny trained run, and a
spiking fine-tuning killed mid-epoch (SIGKILL, SIGTERM) then resumed with `seqep spiking-train --resume`, which
ends exactly as the uninterrupted one (weights to the bit, metrics.jsonl line for line but wall-clock fields)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analog_ep.train.config import apply_overrides, load_preset
from analog_ep.train.trainer import train_run
from tests.processes import TINY, WALL_CLOCK, last, seqep, step_rows, wait_for

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

# 64 samples in batches of 16: 4 batches an epoch, 2 epochs, last.pt after every step
FINETUNE = """
import sys
from spiking_ep.train import SpikingTrainConfig, finetune_spiking
cfg = SpikingTrainConfig(timesteps=8, epochs=2, batch_size=16, lr_scale=0.1, analog_steps=30, log_every=1,
                         checkpoint_every=1)
try:
    finetune_spiking(sys.argv[1], sys.argv[2], cfg=cfg, limit=64, eval_limit=64, progress=False)
except KeyboardInterrupt as stopped:
    sys.exit(getattr(stopped, "exit_code", 130))
"""
KILL_AFTER_STEP = 6  # epoch 2, batch 2


@pytest.fixture(scope="module")
def analog_run(tmp_path_factory) -> Path:
    """A tiny analog IMDB run (one epoch), the run the spiking runs start from."""
    run = tmp_path_factory.mktemp("analog") / "run"
    train_run(apply_overrides(load_preset("imdb", "smoke"), [*TINY, "train.epochs=1"]), run, progress=False)
    return run


def finetune(analog_run: Path, out: Path) -> list[str]:
    return [sys.executable, "-c", FINETUNE, str(analog_run), str(out)]


def test_seqep_train_backend_spiking_finetunes_a_trained_run(analog_run, tmp_path):
    out = tmp_path / "spiking"
    done = subprocess.run(seqep("train", "--backend", "spiking", "--init", str(analog_run), "--out", str(out),
                                "--timesteps", "8", "--limit", "32", "--no-progress", "--json"),
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "finetune" and report["timesteps"] == 8 and report["n_train"] == 32
    assert report["source_run"] == str(analog_run) and 0.0 <= report["test_accuracy"] <= 1.0
    for name in ("config.json", "spiking.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt",
                 "report.json", "plots/spiking_before_after.png"):
        assert (out / name).is_file(), name
    assert not (out / "run.lock").exists()
    assert json.loads((out / "config.json").read_text())["source_run"] == str(analog_run)


@pytest.fixture(scope="module")
def straight(analog_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spiking") / "straight"
    subprocess.run(finetune(analog_run, out), check=True, capture_output=True, timeout=400)
    return out


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in rows]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_spiking_finetuning_killed_mid_epoch_resumes_exactly(analog_run, straight, tmp_path, signum):
    run = tmp_path / "killed"
    proc = subprocess.Popen(finetune(analog_run, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: step_rows(run) >= KILL_AFTER_STEP, proc)
    rows_at_kill = step_rows(run)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    saved = last(run)["progress"]
    if signum == signal.SIGTERM:
        assert proc.returncode == 128 + signum, err
        assert f"continue with `seqep spiking-train --out {run} --resume`" in err
        assert saved["step"] >= rows_at_kill
    else:
        assert proc.returncode == -signum and saved["step"] >= rows_at_kill - 1
    assert saved["epoch"] == 1 and 0 < saved["batch"] < 4
    print(f"{signal.Signals(signum).name} after {rows_at_kill} logged steps; last.pt at step {saved['step']} "
          f"(epoch {saved['epoch'] + 1}, batch {saved['batch']})")
    resumed = subprocess.run(seqep("spiking-train", "--out", str(run), "--resume", "--no-progress", "--json"),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr
    a, b = last(straight), last(run)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert all(torch.equal(v, b["best_model"][k]) for k, v in a["best_model"].items())
    assert metrics(straight) == metrics(run)
    assert len(metrics(run)) == 1 + 2 * 4 + 2  # initial row, one per step, one per epoch: none doubled
    report_a, report_b = (json.loads((r / "report.json").read_text()) for r in (straight, run))
    assert (report_a["after"], report_a["before"], report_a["best_epoch"]) == (
        report_b["after"], report_b["before"], report_b["best_epoch"])
