"""Sentence-pair channels (`embedding.PairFeatures`): exact match and word alignment."""

from __future__ import annotations

import json

import pytest
import torch

from analog_ep.embedding import PairFeatures, alignment_channels, embed_batch
from analog_ep.errors import ConfigError

VECTORS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])  # PAD and four words


def test_alignment_reads_similarity_and_difference_to_the_aligned_word():
    ids = torch.tensor([[[1, 2, 0], [3, 4, 0]]])  # premise: words 1, 2; hypothesis: words 3, 4
    x = embed_batch(ids, VECTORS, PairFeatures(alignment=True, temperature=5.0))
    assert x.shape == (1, 2, 3, 2 + 1 + 2)
    unit = torch.nn.functional.normalize(VECTORS, dim=-1)
    cosine = unit[[1, 2]] @ unit[[3, 4]].T  # premise token i against hypothesis token j
    # similarity: the closest word of the other sentence, clipped at 0
    assert torch.allclose(x[0, 0, :2, 2], cosine.amax(1).clamp(min=0))
    assert torch.allclose(x[0, 1, :2, 2], cosine.amax(0).clamp(min=0))
    # difference: the token minus the other sentence's vectors weighted by softmax(temperature · cosine)
    aligned = torch.softmax(5.0 * cosine, 1) @ VECTORS[[3, 4]]
    assert torch.allclose(x[0, 0, :2, 3:], VECTORS[[1, 2]] - aligned)
    aligned_back = torch.softmax(5.0 * cosine.T, 1) @ VECTORS[[1, 2]]
    assert torch.allclose(x[0, 1, :2, 3:], VECTORS[[3, 4]] - aligned_back)
    assert torch.equal(x[0, :, 2], torch.zeros(2, 5))  # padding stays exactly zero
    assert torch.equal(x[..., :2], embed_batch(ids, VECTORS))  # the word vectors come first, unchanged


def test_a_word_found_in_the_other_sentence_aligns_to_itself_and_an_empty_sentence_to_nothing():
    ids = torch.tensor([[[1, 2, 3], [2, 0, 0]], [[1, 2, 0], [0, 0, 0]]])
    x = alignment_channels(ids, embed_batch(ids, VECTORS), temperature=200.0)
    assert x[0, 1, 0, 0] == pytest.approx(1.0) and x[0, 1, 0, 1:].abs().max() < 1e-6
    assert x[0, 0, 1, 0] == pytest.approx(1.0)  # and the premise's copy of it likewise
    assert torch.equal(x[1, 0, :2], torch.cat([torch.zeros(2, 1), VECTORS[[1, 2]]], 1))  # nothing to align to
    assert torch.equal(x[1, 1], torch.zeros(3, 3))


def test_channels_follow_the_order_and_count_the_features_say():
    ids = torch.tensor([[[1, 2, 0], [2, 4, 0]]])
    both = embed_batch(ids, VECTORS, PairFeatures(exact_match=True, alignment=True))
    assert both.shape[-1] == PairFeatures(True, True).channels(2) + 2 == 6
    assert torch.equal(both[..., :3], embed_batch(ids, VECTORS, PairFeatures(exact_match=True)))
    assert torch.equal(both[..., 3:], embed_batch(ids, VECTORS, PairFeatures(alignment=True))[..., 2:])
    with pytest.raises(ValueError, match="sentence pairs"):
        alignment_channels(ids[:, :1], VECTORS[ids[:, :1]])
    with pytest.raises(ValueError, match="temperature"):
        alignment_channels(ids, VECTORS[ids], temperature=0.0)


@pytest.mark.parametrize("overrides, message", [
    (["data.task=imdb", "data.alignment=true"], "needs sentence pairs"),
    (["data.task=snli", "data.alignment=true", "model.learn_embeddings=true"], "follow the table"),
    (["data.task=snli", "data.alignment=true", "data.alignment_temperature=0"], "must be > 0"),
])
def test_config_refuses_alignment_where_it_cannot_work(overrides, message):
    from analog_ep.train.config import RunConfig, apply_overrides

    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), overrides)


@pytest.mark.realdata
def test_an_snli_run_with_alignment_reads_the_wider_tokens_and_evaluates_the_same(tmp_path, capsys):
    from analog_ep.cli import main
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.config import apply_overrides, load_preset
    from analog_ep.train.trainer import train_run

    cfg = apply_overrides(load_preset("snli", "smoke"), [
        "data.alignment=true", "data.train_limit=256", "data.eval_limit=128", "train.epochs=1",
        "train.batch_size=64", "model.hidden=[16]", "ep.free_steps=10", "ep.nudge_steps=4"])
    report = train_run(cfg, tmp_path / "run", progress=False)
    best, _ = load_model(tmp_path / "run")
    dim = json.loads((tmp_path / "run" / "config.json").read_text())["data_info"]["dim"]
    assert best.spec.dim == dim + cfg.data.extra_channels(dim) == 2 * dim + 1 + int(cfg.data.exact_match)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "test", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["test_accuracy"]
    # 102-wide tokens of 25 words: where our AVX2 kernel loads, training and evaluation fold the first synapse,
    # and the folded evaluation predicts what the plain one does
    from analog_ep.fast.folded import _kernel_for
    from analog_ep.train.trainer import evaluate_split, load_run_data
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_config["fold_keys"] == (_kernel_for(torch.float32, torch.device("cpu")) is not None)
    _, task, embedding = load_run_data(tmp_path / "run", progress=False)
    auto = evaluate_split(best, task.test, embedding, cfg)
    plain = evaluate_split(best, task.test, embedding, apply_overrides(cfg, ["ep.fold_keys=off"]))
    assert torch.equal(auto["predictions"], plain["predictions"]) and auto["accuracy"] == report["test_accuracy"]
