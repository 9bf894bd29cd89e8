"""Training with spikes: fine-tuning a converted model and training from scratch with spike-driven EP."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from synthetic import gaussian_clusters, token_presence_task

from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, make_estimator
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.training_core import layer_param_groups, train_step
from spiking_ep.convert import load_spiking, to_spiking
from spiking_ep.training import (
    SpikingTrainConfig,
    Splits,
    dataset_split,
    fit_spiking,
    spiking_accuracy,
    tensor_split,
)

SEQ_LEN, DIM = 12, 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def token_splits(batch_size: int = 32) -> Splits:
    x, y = token_presence_task(400, seq_len=SEQ_LEN, dim=DIM, seed=0)
    xv, yv = token_presence_task(300, seq_len=SEQ_LEN, dim=DIM, seed=2)
    xt, yt = token_presence_task(500, seq_len=SEQ_LEN, dim=DIM, seed=1)
    return Splits(tensor_split(x, y, batch_size), tensor_split(xv, yv, 300), tensor_split(xt, yt, 500))


def token_net(attention: bool = True) -> EPNet:
    spec = build_spec("imdb", seq_len=SEQ_LEN, dim=DIM, hidden=(32, 10), attention=attention, bias_offset=1.0,
                      gamma=0.25)
    return EPNet(spec, seed=0)


@pytest.fixture(scope="module")
def analog_trained() -> EPNet:
    """The token-presence model trained to ~100 % analog accuracy (as experiments/spiking/common.py)."""
    torch.manual_seed(0)
    net = token_net()
    optimizer = torch.optim.Adam(layer_param_groups(net, 3e-3))
    est = make_estimator("ep_symmetric", EPConfig(beta=0.1, free_steps=20, nudge_steps=8))
    train = token_splits().train
    for epoch in range(12):
        for x, y in train.batches(epoch):
            train_step(net, est, x, y, optimizer)
    return net


def finetune(base: EPNet, out_dir: Path | None = None, **options) -> dict:
    net = EPNet(base.spec)
    net.load_state_dict(base.state_dict())
    cfg = SpikingTrainConfig(timesteps=8, tau=4, beta=0.2, epochs=2, eval_timesteps=(16,), analog_steps=60, **options)
    snet = to_spiking(net, "if", tau=cfg.tau)
    return fit_spiking(snet, torch.optim.Adam(layer_param_groups(net, 1e-3)), token_splits(), cfg, out_dir)


def test_finetuning_improves_spiking_accuracy_at_small_T_and_writes_the_run(analog_trained, tmp_path):
    """Analog-trained weights read out after 8 IF steps are often wrong; spiking EP at T = 8 fixes that,
    and the same extra training done with analog EP (the control arm) does not."""
    report = finetune(analog_trained, tmp_path)
    before, after = report["before"]["accuracy"], report["after"]["accuracy"]
    assert after["8"] >= before["8"] + 0.03, (before, after)
    assert after["16"] >= before["16"] - 0.01
    assert report["after"]["analog_accuracy"] >= 0.95  # still a good analog model
    control = finetune(analog_trained, estimator="analog_ep")["after"]["accuracy"]
    assert after["8"] >= control["8"] + 0.03, (control, after)
    for name in ("report.json", "metrics.jsonl", "spiking.json", "checkpoints/best.pt", "checkpoints/last.pt",
                 "plots/training.png", "plots/spiking_before_after.png"):
        assert (tmp_path / name).is_file(), name
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] in ("initial", "epoch")] == [0, 1, 2]
    assert any(r["kind"] == "step" and r["spikes_per_sample"] > 0 for r in rows)
    assert json.loads((tmp_path / "report.json").read_text())["test_accuracy"] == after["8"]
    reloaded = load_spiking(tmp_path)  # the run directory converts like an analog run: best.pt + spiking.json
    assert reloaded.coding_name == "if" and reloaded.tau == 4
    assert spiking_accuracy(reloaded, token_splits().test, [8], 60)["accuracy"]["8"] == after["8"]


def test_spiking_ep_from_scratch_beats_chance():
    """Three Gaussian clusters, a tiny MLP trained only by spike-driven EP (IF units, T = 32)."""
    x, y = gaussian_clusters(300, seed=1)
    xt, yt = gaussian_clusters(600, seed=2)
    net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0)
    cfg = SpikingTrainConfig(timesteps=32, beta=0.2, epochs=4, batch_size=20, analog_steps=40)
    splits = Splits(tensor_split(x, y, 20), tensor_split(xt[:300], yt[:300], 300), tensor_split(xt, yt, 600))
    report = fit_spiking(to_spiking(net, "if", tau=cfg.tau), torch.optim.Adam(layer_param_groups(net, 3e-3)),
                         splits, cfg)
    assert report["after"]["accuracy"]["32"] >= 0.8, report["curve"]
    assert report["before"]["accuracy"]["32"] < 0.6


def test_spiking_cep_moves_the_weights_itself():
    """C-EP applies its local updates during the nudged phase: the optimiser only supplies step sizes."""
    net = token_net(attention=True)
    start = {n: p.clone() for n, p in net.named_parameters()}
    cfg = SpikingTrainConfig(timesteps=8, estimator="spiking_cep", beta=0.5, epochs=1, analog_steps=20)
    optimizer = torch.optim.SGD(layer_param_groups(net, 1e-3))
    splits = token_splits()
    small = Splits(tensor_split(*next(iter(splits.train.batches(0))), 32), splits.val, splits.val)
    report = fit_spiking(to_spiking(net, "if", tau=4), optimizer, small, cfg)
    assert report["estimator"] == "spiking_cep"
    assert all(not torch.equal(start[n], p) for n, p in net.named_parameters() if n.startswith("weights"))
    assert all(p.grad is None for p in net.parameters())


def test_learning_needs_if_or_bernoulli_units():
    with pytest.raises(ConfigError, match="sigma-delta"):
        SpikingTrainConfig(coding="sigma_delta")
    with pytest.raises(ConfigError, match="estimator"):
        SpikingTrainConfig(estimator="bptt")


class _SortedDataset:
    """Labels sorted as in the IMDB splits (all negatives first)."""

    def __init__(self, n: int) -> None:
        self.ids = torch.arange(n).view(n, 1, 1) % 7 + 2
        self.labels = (torch.arange(n) >= n // 2).long()

    def __len__(self) -> int:
        return len(self.labels)


def test_evaluation_subsets_are_random_not_the_first_n():
    data = _SortedDataset(1000)
    split = dataset_split(data, torch.randn(10, 4), batch_size=64, dtype=torch.float32, limit=200)
    ys = torch.cat([y for _, y in split.batches(None)])
    assert len(ys) == 200 and 0.35 < float(ys.float().mean()) < 0.65
    assert torch.equal(ys, torch.cat([y for _, y in split.batches(None)]))  # the same subset every time
    train = [torch.cat([y for _, y in split.batches(e)]) for e in (0, 1)]
    assert all(len(t) == 200 for t in train) and not torch.equal(train[0], train[1])


def _parse(argv: list[str]) -> argparse.Namespace:
    from spiking_ep.cli import _register_training

    parser = argparse.ArgumentParser(prog="seqep")
    _register_training(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_needs_a_run_or_from_scratch(tmp_path):
    from spiking_ep.cli import run_spiking_train

    with pytest.raises(ConfigError, match="RUN_DIR"):
        run_spiking_train(_parse(["spiking-train", "--out", str(tmp_path / "o")]))
    with pytest.raises(ConfigError, match="not both"):
        run_spiking_train(_parse(["spiking-train", str(tmp_path), "--from-scratch", "--out", str(tmp_path / "o")]))


def test_train_backend_maps_the_analog_train_flags(monkeypatch, tmp_path):
    """`seqep train --backend spiking` → `spiking-train`: fine-tune with `init`, else from the preset."""
    import spiking_ep.training as training
    from spiking_ep.cli import train_backend

    calls = []
    fake = {"mode": "x", "estimator": "spiking_cep", "n_train": 1, "train_minutes": 0.0, "n_test": 1,
            "before": {"accuracy": {"16": 0.5}, "analog_accuracy": 0.5},
            "after": {"accuracy": {"16": 0.6}, "analog_accuracy": 0.5}}
    monkeypatch.setattr(training, "train_spiking_from_scratch", lambda *a, **k: calls.append(("scratch", a, k)) or fake)
    monkeypatch.setattr(training, "finetune_spiking", lambda *a, **k: calls.append(("finetune", a, k)) or fake)
    args = argparse.Namespace(out=str(tmp_path / "o"), task="imdb", preset="smoke", config=None,
                              overrides=["data.train_limit=100"], epochs=2, seed=None, estimator="cep",
                              no_progress=True, resume=False)
    assert train_backend(args) == 0
    kind, a, k = calls[-1]
    assert kind == "scratch" and a[:4] == (str(tmp_path / "o"), "imdb", "smoke", ["data.train_limit=100"])
    assert k["cfg"].estimator == "spiking_cep" and k["cfg"].epochs == 2 and k["cfg"].lr_scale == 1.0
    args.init, args.timesteps = str(tmp_path), 8
    assert train_backend(args) == 0
    kind, a, k = calls[-1]
    assert kind == "finetune" and a[0] == str(tmp_path) and k["cfg"].timesteps == 8 and k["cfg"].lr_scale == 0.1
    args.estimator = "bptt"
    with pytest.raises(ConfigError, match="bptt"):
        train_backend(args)


def test_seqep_train_dispatches_to_the_spiking_backend(monkeypatch, tmp_path, capsys):
    """`seqep train --backend spiking --init RUN` reaches the spiking fine-tuning through the entry point."""
    import spiking_ep.training as training
    from analog_ep.cli import main

    calls = []
    fake = {"mode": "x", "estimator": "spiking_ep", "n_train": 1, "train_minutes": 0.0, "n_test": 1,
            "before": {"accuracy": {"8": 0.5}, "analog_accuracy": 0.5},
            "after": {"accuracy": {"8": 0.6}, "analog_accuracy": 0.5}}
    monkeypatch.setattr(training, "finetune_spiking", lambda *a, **k: calls.append((a, k)) or fake)
    assert main(["train", "--backend", "spiking", "--init", str(tmp_path), "--timesteps", "8",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    (a, k), = calls
    assert a[0] == str(tmp_path) and k["cfg"].timesteps == 8
    capsys.readouterr()
    assert main(["train", "--task", "imdb", "--timesteps", "8", "--out", str(tmp_path / "p")]) == 2
    assert "--timesteps only apply with --backend spiking" in capsys.readouterr().err
    assert main(["train", "--backend", "loihi", "--out", str(tmp_path / "q")]) == 2
    assert "unknown backend 'loihi'" in capsys.readouterr().err


@pytest.mark.realdata
def test_cli_from_scratch_then_finetune_on_imdb(tmp_path, capsys):
    """End to end on real IMDB (a tiny subset): the from-scratch run is itself a run directory to fine-tune."""
    from analog_ep.cli import main
    from analog_ep.data import resolve_data_dir

    if resolve_data_dir(None) is None:
        pytest.skip("no shared data directory")
    scratch, tuned = tmp_path / "scratch", tmp_path / "tuned"
    assert main(["spiking-train", "--from-scratch", "--task", "imdb", "--preset", "smoke", "--set",
                 "data.train_limit=128", "--set", "data.eval_limit=128", "--set", "model.hidden=[16,8]",
                 "--out", str(scratch), "--timesteps", "8", "--eval-limit", "64", "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "from_scratch" and report["n_train"] == 128 and report["spiking"]["attention"] == "dense"
    assert main(["spiking-train", str(scratch), "--out", str(tuned), "--timesteps", "8", "--limit", "64",
                 "--eval-limit", "64", "--no-progress"]) == 0
    assert "before" in capsys.readouterr().out
    config = json.loads((tuned / "config.json").read_text())
    assert config["source_run"] == str(scratch) and config["spiking_train"]["coding"] == "if"
    assert (tuned / "checkpoints" / "best.pt").is_file() and (tuned / "report.json").is_file()
