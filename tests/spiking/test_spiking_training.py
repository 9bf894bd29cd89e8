"""Training with spikes: fine-tuning a converted model and training from scratch with spike-driven EP."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig, make_estimator
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.inner_loop import layer_param_groups, train_step
from spiking_ep.convert import load_spiking, to_spiking
from spiking_ep.train.trainer import (
    SpikingTrainConfig,
    Splits,
    dataset_split,
    fit_spiking,
    spiking_accuracy,
    tensor_split,
)
from tests.synthetic import gaussian_clusters, token_presence_task

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
    """Three epochs of fine-tuning from the same random state whatever ran before (the spiking evaluation and the
    batches draw from it: with two epochs, and the state other tests left, the gain at T = 8 ranged from +0.2 to
    +5 points)."""
    torch.manual_seed(0)
    net = EPNet(base.spec)
    net.load_state_dict(base.state_dict())
    cfg = SpikingTrainConfig(timesteps=8, tau=4, beta=0.2, epochs=3, eval_timesteps=(16,), analog_steps=60, **options)
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
    assert [r["epoch"] for r in rows if r["kind"] in ("initial", "epoch")] == [0, 1, 2, 3]
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
    from spiking_ep.commands import _register_training

    parser = argparse.ArgumentParser(prog="seqep")
    _register_training(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_needs_a_run_or_from_scratch(tmp_path):
    from spiking_ep.commands import run_spiking_train

    with pytest.raises(ConfigError, match="RUN_DIR"):
        run_spiking_train(_parse(["spiking-train", "--out", str(tmp_path / "o")]))
    with pytest.raises(ConfigError, match="not both"):
        run_spiking_train(_parse(["spiking-train", str(tmp_path), "--from-scratch", "--out", str(tmp_path / "o")]))


def fake_spiking_training(monkeypatch) -> list:
    """Replace the two spiking training entry points by recorders: calls are (kind, args, kwargs). Replaced in
    every loaded module that holds them, wherever the command imports them from."""
    import sys

    import spiking_ep.commands  # noqa: F401  (loads the command modules that import them)

    calls: list = []
    fake = {"mode": "x", "estimator": "spiking_ep", "n_train": 1, "train_minutes": 0.0, "n_test": 1,
            "before": {"accuracy": {"8": 0.5}, "analog_accuracy": 0.5},
            "after": {"accuracy": {"8": 0.6}, "analog_accuracy": 0.5}}
    fakes = {"train_spiking_from_scratch": lambda *a, **k: calls.append(("scratch", a, k)) or fake,
             "finetune_spiking": lambda *a, **k: calls.append(("finetune", a, k)) or fake}
    prefixes = ("spiking_ep.train", "spiking_ep.commands")
    for module in [m for name, m in sys.modules.items() if name.startswith(prefixes)]:
        for name, replacement in fakes.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, replacement)
    return calls


def test_train_backend_maps_the_analog_train_flags(monkeypatch, tmp_path):
    """`seqep train --backend spiking` → `spiking-train`: fine-tune with `init`, else from the preset."""
    from spiking_ep.commands import train_backend

    calls = fake_spiking_training(monkeypatch)
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
    from analog_ep.cli import main

    calls = fake_spiking_training(monkeypatch)
    assert main(["train", "--backend", "spiking", "--init", str(tmp_path), "--timesteps", "8",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    (kind, a, k), = calls
    assert kind == "finetune" and a[0] == str(tmp_path) and k["cfg"].timesteps == 8
    capsys.readouterr()
    assert main(["train", "--task", "imdb", "--timesteps", "8", "--out", str(tmp_path / "p")]) == 2
    assert "--timesteps only apply with --backend spiking" in capsys.readouterr().err
    assert main(["train", "--backend", "loihi", "--out", str(tmp_path / "q")]) == 2
    assert "unknown backend 'loihi'" in capsys.readouterr().err


@pytest.mark.realdata
def test_cli_from_scratch_then_finetune_on_imdb(tmp_path, capsys):
    """End to end on real IMDB (a tiny subset): the from-scratch run is itself a run directory to fine-tune."""
    from analog_ep.cli import main

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


# ---------------------------------------------------------------- resume (seqep spiking-train --resume)
def small_splits() -> Splits:
    x, y = gaussian_clusters(120, seed=1)
    xt, yt = gaussian_clusters(200, seed=2)
    return Splits(tensor_split(x, y, 20), tensor_split(xt[:100], yt[:100], 100), tensor_split(xt[100:], yt[100:], 100))


def small_fit(out_dir: Path, epochs: int, resume: bool = False, **options) -> tuple[EPNet, dict]:
    """A fresh network and optimiser each call, as a new process has: resuming must restore both.

    Measured: val accuracy at T = 8 after epochs 0…4 is 0.52, 0.87, 0.99, 1.0, 1.0, so epoch 3 stays the best."""
    net = EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0)
    cfg = SpikingTrainConfig(**{"timesteps": 8, "beta": 0.5, "epochs": epochs, "batch_size": 20, "analog_steps": 30,
                                "log_every": 1, **options})
    report = fit_spiking(to_spiking(net, "if", tau=cfg.tau), torch.optim.Adam(layer_param_groups(net, 3e-2)),
                         small_splits(), cfg, out_dir, resume=resume)
    return net, report


def _rows(run: Path) -> list[tuple]:
    return [(r["kind"], r.get("step"), r["epoch"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory) -> Path:
    """A 1-epoch run with the config.json a from-scratch `spiking-train` writes (read-only for the tests)."""
    from analog_ep.train.run_dir import write_json

    run = tmp_path_factory.mktemp("spiking") / "run"
    _, report = small_fit(run, 1)
    write_json(run / "config.json", {"config": {}, "spiking_train": report["spiking_train"], "mode": "from_scratch",
                                     "limit": None, "eval_limit": 1000})
    return run


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    """4 epochs straight = 3 epochs, a fresh process, resume to 4: same weights, optimiser, curve, best epoch
    (the 3rd: the resumed run must remember that epoch 4 only ties it), metrics."""
    straight, a = small_fit(tmp_path / "a", 4)
    small_fit(tmp_path / "b", 3)
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:  # rows of an epoch interrupted after last.pt
        f.write(json.dumps({"kind": "step", "step": 999, "epoch": 3.5}) + "\n")
        f.write(json.dumps({"kind": "epoch", "epoch": 4, "val_accuracy": 0.0}) + "\n")
    resumed, b = small_fit(tmp_path / "b", 4, resume=True)
    for name, p in straight.state_dict().items():  # the best weights the report evaluates
        assert torch.equal(p, resumed.state_dict()[name]), name
    last_a, last_b = _last(tmp_path / "a"), _last(tmp_path / "b")
    assert all(torch.equal(v, last_b["model"][k]) for k, v in last_a["model"].items())
    adam_a, adam_b = last_a["optimizer"]["state"], last_b["optimizer"]["state"]
    assert adam_a.keys() == adam_b.keys() and all(
        torch.equal(adam_a[i][k], adam_b[i][k]) for i in adam_a for k in ("step", "exp_avg", "exp_avg_sq"))
    assert [r["val_accuracy"] for r in a["curve"]] == [r["val_accuracy"] for r in b["curve"]]
    assert (a["best_epoch"], a["before"], a["after"]) == (b["best_epoch"], b["before"], b["after"])
    assert last_b["progress"]["epoch"] == 4 and last_b["progress"]["best_epoch"] == a["best_epoch"]
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")  # the interrupted epoch's rows are gone, none doubled
    assert [r[2] for r in _rows(tmp_path / "b") if r[0] != "step"] == [0, 1, 2, 3, 4]
    again, c = small_fit(tmp_path / "b", 4, resume=True)  # a finished run: re-evaluated, nothing trained
    assert (c["test_accuracy"], c["curve"]) == (b["test_accuracy"], b["curve"])
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")


def test_resume_refuses_another_learning_problem(one_epoch_run, tmp_path):
    """Only --epochs may change; a flag that changes what is learned names itself and says how to go on."""
    from spiking_ep.commands import run_spiking_train
    from spiking_ep.train.trainer import resume_options

    cfg, limits = resume_options(one_epoch_run, epochs=3, timesteps=8, beta=0.5)
    assert (cfg.epochs, cfg.timesteps, limits) == (3, 8, {"limit": None, "eval_limit": 1000})
    assert resume_options(one_epoch_run)[0].epochs == 1
    for flags, match in ((["--timesteps", "16"], "--timesteps 16: the run was trained with --timesteps 8"),
                         (["--estimator", "spiking_cep"], "--estimator"), (["--coding", "bernoulli"], "--coding"),
                         (["--beta", "0.2"], "--beta"), (["--limit", "64"], "--limit"),
                         (["--epochs", "0"], "1 completed epochs")):
        with pytest.raises(ConfigError, match=match) as err:
            run_spiking_train(_parse(["spiking-train", "--out", str(one_epoch_run), "--resume", *flags]))
        assert "--epochs" in str(err.value) or "new --out" in str(err.value)
    with pytest.raises(ConfigError, match="--timesteps"):  # the core checks last.pt itself
        small_fit(one_epoch_run, 2, resume=True, timesteps=16)
    with pytest.raises(ConfigError, match="from scratch"):  # the source run is part of the problem too
        run_spiking_train(_parse(["spiking-train", str(tmp_path), "--out", str(one_epoch_run), "--resume"]))
    finetuned = tmp_path / "ft"
    shutil.copytree(one_epoch_run, finetuned)
    config = json.loads((finetuned / "config.json").read_text())
    (finetuned / "config.json").write_text(json.dumps({**config, "source_run": str(tmp_path / "analog")}))
    with pytest.raises(ConfigError, match="fine-tunes .*analog, not .*other: resume without RUN_DIR"):
        run_spiking_train(_parse(["spiking-train", str(tmp_path / "other"), "--out", str(finetuned), "--resume"]))
    with pytest.raises(ConfigError, match="without --from-scratch"):
        run_spiking_train(_parse(["spiking-train", "--from-scratch", "--out", str(finetuned), "--resume"]))


def test_resume_needs_a_run_and_a_run_needs_resume(one_epoch_run, tmp_path):
    from spiking_ep.commands import run_spiking_train

    with pytest.raises(ConfigError, match="nothing to resume"):
        small_fit(tmp_path / "empty", 1, resume=True)
    with pytest.raises(ConfigError, match=r"nothing to resume .*config.json"):
        run_spiking_train(_parse(["spiking-train", "--out", str(tmp_path / "empty"), "--resume"]))
    with pytest.raises(ConfigError, match="already holds a run: add --resume"):
        small_fit(one_epoch_run, 1)


def test_train_backend_passes_resume_through(one_epoch_run, monkeypatch):
    """`seqep train --backend spiking --out DIR --resume`: the run in DIR says what it is (as `seqep train
    --resume`), the flags given are checked against it."""
    from analog_ep.cli import main
    from spiking_ep.commands import train_backend

    calls = fake_spiking_training(monkeypatch)
    args = argparse.Namespace(out=str(one_epoch_run), task=None, preset="smoke", config=None, overrides=[], epochs=3,
                              seed=None, estimator=None, no_progress=True, resume=True)
    assert train_backend(args) == 0
    kind, a, k = calls[-1]
    assert kind == "scratch" and a[:3] == (str(one_epoch_run), None, None) and k["resume"]
    assert k["cfg"].epochs == 3 and k["cfg"].timesteps == 8 and k["cfg"].beta == 0.5
    assert main(["train", "--backend", "spiking", "--out", str(one_epoch_run), "--resume", "--no-progress"]) == 0
    assert calls[-1][2]["resume"] and calls[-1][2]["cfg"].epochs == 1
    args.estimator = "cep"
    with pytest.raises(ConfigError, match="--estimator spiking_cep"):
        train_backend(args)


@pytest.mark.realdata
def test_run_batches_subset_is_seeded_and_holds_both_classes(tmp_path):
    """Stored splits are ordered by label: a --limit subset must be drawn at random (seeded), not the first N
    (which would make `seqep compare --limit` and the demo's NIR check one-class samples)."""
    from analog_ep.cli import main
    from spiking_ep.evaluate import batches_from_run, run_batches

    run = tmp_path / "run"
    assert main(["train", "--task", "imdb", "--preset", "smoke", "--set", "data.train_limit=64", "--set",
                 "data.eval_limit=200", "--set", "model.hidden=[8,4]", "--set", "train.epochs=1",
                 "--out", str(run), "--no-progress"]) == 0
    batches, count, info = run_batches(run, "test", limit=40, batch_size=16)
    labels = torch.cat([y for _, y in batches])
    assert count == 3 and info["samples"] == 40 and info["subset_seed"] == 0
    assert 0 < labels.float().mean() < 1  # both classes (the first 40 stored are all negative)
    again = torch.cat([y for _, y in batches_from_run(run, "test", 40, 16)])
    assert torch.equal(labels, again)
