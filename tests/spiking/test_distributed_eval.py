"""`seqep spiking-eval` and `seqep compare` under torchrun (2 gloo processes on the CPU) give one process's numbers.

Each rank evaluates a contiguous run of whole batches (the batches one process forms), so every batch's spiking
run is the one-process run: counts (correct, agreements, spikes) are compared exactly; the summed distances to
the analog states are the one-process sums in another order, compared at 1e-12 relative. The one-process
baseline runs in this process with one torch thread, as each rank does (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analog_ep.train.checkpoint import save_model
from tests.helpers import trained_tiny_imdb

pytestmark = pytest.mark.usefixtures("one_thread")
DISTANCE_RTOL = 1e-12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny IMDB-shaped run directory and a data file of 70 of its test samples."""
    net, (x, y) = trained_tiny_imdb()
    root = tmp_path_factory.mktemp("distributed-eval")
    save_model(root / "run" / "checkpoints" / "best.pt", net)
    torch.save({"x": x[:70], "y": y[:70]}, root / "test.pt")
    return root


def torchrun(*argv: str) -> dict:
    """`seqep ARGV --json` on 2 processes; its one JSON output (rank 0's)."""
    launcher = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    done = subprocess.run([launcher, "--standalone", "--nproc_per_node", "2", "-m", "analog_ep.cli", *argv, "--json"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # a second rank printing would make this invalid JSON


def one_process(capsys, *argv: str) -> dict:
    from analog_ep.cli import main

    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_rows(shared: dict, alone: dict) -> None:
    """Per T: every count equal, the distances to the analog states equal to rounding."""
    assert shared.keys() == alone.keys()
    for T, row in alone.items():
        other = dict(shared[T])
        for layer, d in other.pop("distance_to_analog").items():
            assert d == pytest.approx(row["distance_to_analog"][layer], rel=DISTANCE_RTOL, abs=0), (T, layer)
        assert other == {k: v for k, v in row.items() if k != "distance_to_analog"}, T


@pytest.mark.parametrize("limit, split", [(None, "5 batches: 3 + 2"), ("10", "1 batch: rank 1 has none")])
def test_spiking_eval_on_two_processes_gives_the_one_process_numbers(trained, capsys, limit, split):
    # Bernoulli units and sampled attention: a generator seeded per batch, so a shard that cut a batch would differ
    argv = ["spiking-eval", str(trained / "run"), "--data", str(trained / "test.pt"), "--batch-size", "16",
            "--coding", "bernoulli", "--timesteps", "8,32", "--plot", str(trained / "plot.png"),
            *(["--limit", limit] if limit else [])]
    alone, shared = one_process(capsys, *argv), torchrun(*argv)
    assert (alone["world_size"], shared["world_size"]) == (1, 2)
    assert shared["samples"] == alone["samples"] == (int(limit) if limit else 70)
    assert shared["analog"] == alone["analog"]
    assert shared["timesteps_for_gap"] == alone["timesteps_for_gap"]
    assert_same_rows(shared["timesteps"], alone["timesteps"])
    assert 0 < alone["timesteps"]["32"]["agreement"] <= 1 and alone["timesteps"]["32"]["spikes_per_sample"] > 0


def test_compare_on_two_processes_writes_the_one_process_report(trained, capsys):
    for name in ("alone", "shared"):
        shutil.copytree(trained / "run", trained / name)
    argv = ["--data", str(trained / "test.pt"), "--limit", "24", "--batch-size", "8", "--timesteps", "8,16",
            "--probe-samples", "8", "--no-plots", "--no-progress"]  # 3 batches: 2 + 1
    alone = one_process(capsys, "compare", str(trained / "alone"), *argv)
    shared = torchrun("compare", str(trained / "shared"), *argv)
    written = json.loads((trained / "shared" / "compare" / "compare.json").read_text())
    assert written["samples"] == shared["samples"] == alone["samples"] == 24
    assert_same_rows(shared["timesteps"], alone["timesteps"])
    for part in ("analog", "probe", "profiles", "counts", "spiking_config"):
        assert shared[part] == alone[part], part
