"""Config validation, presets, and the trainer on real data: smoke accuracy, exact evaluate, exact resume."""

import json

import pytest
import torch

from analog_ep.cli import main
from analog_ep.errors import ConfigError
from analog_ep.train.checkpoint import load_model
from analog_ep.train.config import PRESET_DIR, RunConfig, apply_overrides, load_preset, load_toml, parse_override
from analog_ep.train.trainer import Trainer, train_run


def test_every_preset_file_loads_and_validates():
    files = sorted(PRESET_DIR.glob("*.toml"))
    assert {f.stem for f in files} >= {f"{t}-{p}" for t in ("imdb", "snli") for p in ("smoke", "cpu", "paper")}
    for f in files:
        task, preset = f.stem.split("-")
        assert load_preset(task, preset).data.task == task


def test_paper_presets_hold_the_paper_settings():
    imdb, snli = load_preset("imdb", "paper"), load_preset("snli", "paper")
    assert (imdb.data.max_len, imdb.model.hidden, imdb.ep.beta, imdb.ep.free_steps, imdb.ep.nudge_steps) == (
        600, [1000, 40], 0.1, 50, 25)
    assert (imdb.train.epochs, imdb.train.batch_size, imdb.train.lrs) == (40, 128, [1e-4, 5e-5, 5e-5, 5e-5])
    assert (snli.data.max_len, snli.model.hidden, snli.ep.beta, snli.ep.free_steps, snli.ep.nudge_steps) == (
        25, [400], 0.5, 60, 30)
    assert (snli.train.epochs, snli.train.batch_size, snli.model.gamma) == (50, 256, 0.16)
    assert imdb.ep.estimator == snli.ep.estimator == "ep_symmetric"


@pytest.mark.parametrize("raw,match", [
    ({"train": {"epochz": 3}}, "unknown key train.epochz"),
    ({"optim": {}}, "unknown section"),
    ({"ep": {"beta": "big"}}, "wrong type"),
    ({"ep": {"estimator": "magic"}}, "choose one of"),
    ({"ep": {"precision": "fp16"}}, "choose one of"),
    ({"ep": {"beta": 0}}, "must be > 0"),
    ({"model": {"hidden": [10, -1]}}, "hidden sizes"),
    ({"data": {"task": "imdb", "exact_match": True}}, "needs sentence pairs"),
])
def test_bad_configs_are_clear_errors(raw, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(raw)


def test_overrides_parse_toml_literals_and_find_unique_keys():
    cfg = apply_overrides(RunConfig(), ["ep.beta=0.2", "lrs=[1e-3, 5e-4]", "data.vectors=w2v:300",
                                        "train.max_minutes=none", "epochs=7"])
    assert (cfg.ep.beta, cfg.train.lrs, cfg.data.vectors, cfg.train.max_minutes, cfg.train.epochs) == (
        0.2, [1e-3, 5e-4], "w2v:300", None, 7)
    assert parse_override("model.attention=false") == ("model", "attention", False)
    from analog_ep.train.trainer import ep_config

    assert ep_config(apply_overrides(RunConfig(), ["ep.precision=bf16"])).precision == "bf16"
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides(RunConfig(), ["beta"])
    with pytest.raises(ConfigError, match="unknown"):
        apply_overrides(RunConfig(), ["nonsense=1"])


def test_bad_toml_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ep\nbeta = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


TINY_RUN = ["data.train_limit=320", "data.eval_limit=200", "data.max_len=48", "model.hidden=[16, 8]",
            "model.pool_queries=4", "ep.free_steps=15", "ep.nudge_steps=5", "train.batch_size=32",
            "train.epochs=2", "train.log_every=2"]


def tiny_config(**extra) -> RunConfig:
    cfg = load_preset("imdb", "smoke")
    return apply_overrides(cfg, TINY_RUN + [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.realdata
def test_resume_after_interruption_gives_the_same_model(tmp_path, monkeypatch):
    straight = train_run(tiny_config(), tmp_path / "a", progress=False)

    trainer = Trainer(tiny_config(), tmp_path / "b", progress=False)
    trainer.setup()
    calls = {"n": 0}
    original = trainer._estimator

    def interrupt_after_15(*a):  # Ctrl-C in the middle of the second epoch
        calls["n"] += 1
        if calls["n"] == 15:
            raise KeyboardInterrupt
        return original(*a)

    monkeypatch.setattr(trainer, "_estimator", interrupt_after_15)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    trainer._save_last()
    last = tmp_path / "b" / "checkpoints" / "last.pt"  # as a checkpoint written before ep.beta_sign existed:
    ckpt = torch.load(last, weights_only=True)        # a key added since takes its default, not a "change"
    del ckpt["config"]["ep"]["beta_sign"]
    torch.save(ckpt, last)
    resumed = train_run(tiny_config(), tmp_path / "b", resume=True, progress=False)
    a, _ = load_model(tmp_path / "a", "last.pt")
    b, _ = load_model(tmp_path / "b", "last.pt")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert resumed["test_accuracy"] == straight["test_accuracy"]


@pytest.mark.realdata
def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    with pytest.raises(Exception, match="nothing to resume"):
        Trainer(tiny_config(), tmp_path / "empty", resume=True)
    train_run(tiny_config(**{"train.epochs": 1}), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(tiny_config(), tmp_path / "r")


@pytest.mark.realdata
def test_smoke_preset_beats_70_percent_and_evaluate_reproduces_it(tmp_path, capsys):
    run = tmp_path / "smoke"
    assert main(["train", "--task", "imdb", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["test_accuracy"] > 0.70
    assert (run / "plots" / "training.png").stat().st_size > 10_000
    assert {"test_accuracy", "val_accuracy", "epochs_completed", "train_minutes", "estimator", "data",
            "software", "seed"} <= set(report)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "epoch" for r in rows) and any(r["kind"] == "step" for r in rows)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--split", "test", "--json", "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == report["test_accuracy"]


def test_unknown_evaluation_backend_is_a_clear_error(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path), "--backend", "quantum"]) == 2
    assert "unknown backend 'quantum'" in capsys.readouterr().err


def test_train_without_task_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "--task is required" in capsys.readouterr().err


@pytest.mark.parametrize("norm", ["standardize", "whiten"])
def test_input_norms_give_unit_variance_over_train_tokens(norm):
    """Weighted by how often the training split uses each word: standardize → unit diagonal, whiten → identity."""
    from types import SimpleNamespace

    from analog_ep.train.trainer import model_embedding

    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=g)
    emb = torch.cat([torch.zeros(2, 6), torch.randn(40, 6, generator=g) @ mixing + 3.0])  # correlated, offset
    ids = torch.randint(2, 42, (50, 1, 30), generator=g, dtype=torch.int32)
    task = SimpleNamespace(embedding=emb, train=SimpleNamespace(ids=ids), info={})
    cfg = SimpleNamespace(model=SimpleNamespace(input_norm=norm))
    out = model_embedding(cfg, task).double()
    assert torch.equal(out[:2], torch.zeros(2, 6, dtype=out.dtype))  # PAD and UNK stay zero
    tokens = out[ids.flatten().long()]
    cov = torch.cov(tokens.t(), correction=0)
    assert tokens.mean(0).abs().max() < 1e-5
    expected = torch.eye(6, dtype=cov.dtype)
    if norm == "standardize":
        assert torch.allclose(cov.diagonal(), expected.diagonal(), atol=1e-4)
        assert (cov - torch.diag(cov.diagonal())).abs().max() > 0.1  # correlations left in place
    else:
        assert torch.allclose(cov, expected, atol=1e-4)


def test_adam_is_fused_unless_asked_for_torchs_per_tensor_loop():
    from analog_ep.phi import EPNet, GraphSpec
    from analog_ep.train.trainer import make_optimizer

    net = EPNet(GraphSpec(num_streams=1, seq_len=2, dim=3, layers=(4, 2)), seed=0)
    fused = make_optimizer(apply_overrides(RunConfig(), ["lrs=[1e-3]"]), net)
    loop = make_optimizer(apply_overrides(RunConfig(), ["lrs=[1e-3]", "train.optimizer=adam_unfused"]), net)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    with pytest.raises(ConfigError, match="optimizer"):
        apply_overrides(RunConfig(), ["train.optimizer=adamw"])
