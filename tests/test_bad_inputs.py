"""Every bad input a user can give the command line ends in one clean line: exit status 2, the field, the fix.

The cases are grouped by category; docs/reliability.md quotes the count per category that this file checks.
"""

from __future__ import annotations

import pytest
import torch

from analog_ep.cli import main
from analog_ep.train.checkpoint import save_model
from tests.helpers import tiny_net

TRAIN = ["train", "--task", "imdb", "--preset", "smoke"]


def _run_dir(tmp_path):
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", tiny_net("mlp", torch.float32))
    return run


def _truncated(tmp_path):
    run = _run_dir(tmp_path)
    data = (run / "checkpoints" / "best.pt").read_bytes()
    (run / "checkpoints" / "best.pt").write_bytes(data[: len(data) // 2])
    return run


def _bad_utf8_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b"[train]\nepochs = \xff\n")
    return path


CASES: dict[str, list[tuple[str, object]]] = {
    "config values": [
        ("negative beta", lambda t: TRAIN + ["--set", "ep.beta=-1", "--out", str(t / "o")]),
        ("learning rates not numbers", lambda t: TRAIN + ["--set", "train.lrs=abc", "--out", str(t / "o")]),
        ("unknown key", lambda t: TRAIN + ["--set", "train.epochz=3", "--out", str(t / "o")]),
        ("unknown section", lambda t: TRAIN + ["--set", "optim.lr=3", "--out", str(t / "o")]),
        ("override without =", lambda t: TRAIN + ["--set", "ep.beta", "--out", str(t / "o")]),
        ("zero free steps", lambda t: TRAIN + ["--set", "ep.free_steps=0", "--out", str(t / "o")]),
        ("zero batch size", lambda t: TRAIN + ["--set", "train.batch_size=0", "--out", str(t / "o")]),
        ("zero epochs", lambda t: TRAIN + ["--epochs", "0", "--out", str(t / "o")]),
        ("unknown estimator in a config", lambda t: TRAIN + ["--set", "ep.estimator=magic", "--out", str(t / "o")]),
    ],
    "devices": [
        ("cuda without a GPU", lambda t: TRAIN + ["--device", "cuda", "--out", str(t / "o")]),
        ("unknown device", lambda t: TRAIN + ["--device", "tpu7", "--out", str(t / "o")]),
    ],
    "files and run directories": [
        ("missing run directory", lambda t: ["evaluate", str(t / "nope")]),
        ("resume of a directory that never ran", lambda t: ["train", "--out", str(t / "empty"), "--resume"]),
        ("truncated checkpoint", lambda t: ["convert", str(_truncated(t))]),
        ("missing config file", lambda t: ["train", "--config", str(t / "none.toml"), "--out", str(t / "o")]),
        ("config file not UTF-8", lambda t: ["train", "--config", str(_bad_utf8_config(t)), "--out", str(t / "o")]),
        ("checkpoint-convert without --trust", lambda t: ["checkpoint-convert", str(t / "x.pt")]),
        ("weights file that is not safetensors", lambda t: ["import-weights", str(_truncated(t) / "checkpoints" /
                                                                                  "best.pt"), "--out", str(t / "w")]),
        ("missing data directory", lambda t: ["data", "--task", "imdb", "--data-dir", str(t / "nodata")]),
    ],
    "spiking options": [
        ("timesteps not numbers", lambda t: ["spiking-eval", str(_run_dir(t)), "--timesteps", "abc"]),
        ("zero timesteps", lambda t: ["spiking-eval", str(_run_dir(t)), "--timesteps", "0"]),
        ("negative timesteps", lambda t: ["spiking-eval", str(_run_dir(t)), "--timesteps", "-8"]),
        ("unknown coding", lambda t: ["convert", str(_run_dir(t)), "--coding", "telepathy"]),
        ("unknown energy profile", lambda t: ["compare", str(_run_dir(t)), "--profile", "quantum9", "--synthetic",
                                              "4"]),
    ],
}


@pytest.mark.parametrize("category,name,argv", [(c, n, a) for c, cases in CASES.items() for n, a in cases],
                         ids=[f"{c}: {n}" for c, cases in CASES.items() for n, _ in cases])
def test_a_bad_input_ends_in_one_clean_line(category, name, argv, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    try:
        code = main(argv(tmp_path))
    except SystemExit as stop:  # argparse's own refusals (a choice or a type): usage, then one error line
        code = stop.code
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{name}: exit {code}, stderr {err!r}"
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("seqep ") and "error:" in last, err
    assert len(last) > 40, f"{name}: the message must say what to fix: {last!r}"


def test_every_category_has_cases():
    """The counts docs/reliability.md quotes come from CASES; none may be empty."""
    assert {c: len(v) for c, v in CASES.items()} == {c: len(v) for c, v in CASES.items() if v}
