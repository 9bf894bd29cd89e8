"""`seqep demo`: data-directory resolution, safe --fresh, and (slow, real data) the whole job in < 10 minutes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from analog_ep.errors import ConfigError, DataError
from spiking_ep.demo import prepare_out_dir, resolve_data_dir, run_demo, summary_table

REPO = Path(__file__).resolve().parents[2]


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQEP_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(tmp_path / "repo") == tmp_path
    monkeypatch.setenv("SEQEP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="not a directory"):
        resolve_data_dir(tmp_path / "repo")


def test_data_dir_falls_back_to_shared_data_next_to_the_repo(tmp_path, monkeypatch):
    # setenv first so that monkeypatch restores the caller's state (unset included): the code under test
    # writes os.environ itself, and a bare delenv(raising=False) of an unset variable records nothing to undo
    monkeypatch.setenv("SEQEP_DATA_DIR", "")
    monkeypatch.delenv("SEQEP_DATA_DIR")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert resolve_data_dir(tmp_path / "repo") == (tmp_path / "shared" / "data").resolve()
    assert os.environ["SEQEP_DATA_DIR"] == str((tmp_path / "shared" / "data").resolve())
    monkeypatch.delenv("SEQEP_DATA_DIR")
    with pytest.raises(DataError, match="set SEQEP_DATA_DIR"):
        resolve_data_dir(tmp_path / "elsewhere" / "repo")


def test_fresh_deletes_only_run_directories(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("x")
    with pytest.raises(ConfigError, match="not a seqep run directory"):
        prepare_out_dir(other, fresh=True)
    assert (other / "holiday.jpg").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    prepare_out_dir(run, fresh=True)
    assert not run.exists()
    prepare_out_dir(tmp_path / "new", fresh=True)  # nothing to delete


def test_unknown_stage_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="stages are"):
        run_demo(tmp_path / "demo", skip=["train", "plots"])


def test_summary_table_quotes_what_the_run_measured():
    summary = {"out": "runs/demo", "seconds": {"train": 30.0, "total": 60.0},
               "train": {"status": "completed", "test_accuracy": 0.6123, "n_test": 400, "train_minutes": 0.5},
               "nir": {"path": "runs/demo/model.nir", "check": None}}
    table = summary_table(summary)
    assert "test accuracy 61.23 % on 400 reviews" in table
    assert "no round trip: norse is not installed" in table and "timings: train 30 s, total 60 s" in table


def test_summary_table_names_every_nir_consumer():
    check = {"samples": 64, "steps": 256, "agreement_with_analog": 0.98, "accuracy": 0.75,
             "consumers": {"norse": {"identical_output_trains": 1.0, "max_count_difference": 0},
                           "snntorch": {"identical_output_trains": 0.5, "max_count_difference": 3}}}
    summary = {"out": "runs/demo", "seconds": {"total": 60.0}, "train": {"status": "completed", "test_accuracy": 0.7,
               "n_test": 400, "train_minutes": 0.5}, "nir": {"path": "runs/demo/model.nir", "check": check}}
    table = summary_table(summary)
    assert "norse 100.0 % (max count difference 0)" in table and "snntorch 50.0 % (max count difference 3)" in table


@pytest.mark.slow
@pytest.mark.realdata
def test_full_demo_runs_in_under_ten_minutes(tmp_path):
    start = time.perf_counter()
    summary = run_demo(tmp_path / "demo", progress=False)
    wall = time.perf_counter() - start
    assert wall < 600, f"the demo took {wall:.0f} s"
    out = tmp_path / "demo"
    for name in ("report.json", "spiking.json", "model.nir", "demo.json", "compare/compare.json", "compare/compare.md",
                 "compare/plots/pareto.png"):
        assert (out / name).is_file(), name
    assert summary["train"]["test_accuracy"] > 0.6
    cmp = summary["compare"]
    assert set(cmp["timesteps"]) == {"8", "16", "32", "64"} and set(cmp["analog_energy_uj"]) == {"cmos45nm", "loihi"}
    assert summary["nir"]["check"]["identical_output_trains"] >= 0.99
    table = summary_table(summary)
    assert "spiking, T = 64" in table and "loihi" in table and "NIR" in table
    assert json.loads((out / "demo.json").read_text())["seconds"]["total"] > 0
    again = run_demo(out, skip=["compare", "nir"], progress=False)  # a finished run is reused, not retrained
    assert again["seconds"]["train"] < 30
