"""Word n-grams as tokens: vocabulary from the training split only, streams kept apart, vectors start at the
mean of their words, and a run with them trains, reloads the same data and evaluates to the same number."""

from __future__ import annotations

import json

import pytest
import torch

from analog_ep.data.dataset import SequenceDataset, TaskData
from analog_ep.data.ngrams import add_ngrams, word_ids
from analog_ep.errors import ConfigError, DataError

WORDS = ["<pad>", "<unk>", "not", "good", "bad", "film", "very"]


def toy_task(train: list[list[list[int]]], test: list[list[list[int]]] | None = None) -> TaskData:
    def split(rows: list[list[list[int]]], role: str) -> SequenceDataset:
        ids = torch.tensor(rows, dtype=torch.int32)
        return SequenceDataset(ids, torch.zeros(len(rows), dtype=torch.int64), role)

    train_split = split(train, "train")
    test_split = split(test, "test") if test is not None else train_split
    table = torch.arange(len(WORDS) * 2, dtype=torch.float32).reshape(len(WORDS), 2)
    table[:2] = 0
    return TaskData("toy", train_split, test_split, test_split, table, 2, ["neg", "pos"],
                    len(train[0]), len(train[0][0]), vocab=list(WORDS), info={"vocab": {"size": len(WORDS)}})


def names(task: TaskData, row: torch.Tensor) -> list[str]:
    return [task.vocab[i] for i in row.tolist() if i]


def test_pairs_known_from_training_become_tokens_after_the_words():
    task = toy_task([[[2, 3, 5, 0]], [[2, 3, 0, 0]]], test=[[[6, 2, 3, 0]], [[5, 6, 0, 0]]])
    grams = add_ngrams(task, n=2, min_freq=2)
    assert grams.vocab[len(WORDS):] == ["not good"]  # "good film" occurs once: below min_freq
    assert grams.max_len == 4 + 3 and grams.test.ids.shape == (2, 1, 7)
    assert names(grams, grams.test.ids[0, 0]) == ["very", "not", "good", "not good"]
    assert names(grams, grams.test.ids[1, 0]) == ["film", "very"]  # "film very": never in training
    assert grams.info["ngrams"] == {"n": 2, "min_freq": 2, "added": {"2": 1}, "word_slots": 4,
                                    "word_ids": len(WORDS)}
    assert word_ids(grams) == word_ids(task) == len(WORDS)
    assert grams.info["vocab"]["size"] == len(WORDS) + 1
    assert torch.equal(grams.embedding[: len(WORDS)], task.embedding)
    assert torch.equal(grams.embedding[-1], (task.embedding[2] + task.embedding[3]) / 2)


def test_trigrams_extend_kept_pairs_and_start_at_the_mean_of_three_words():
    task = toy_task([[[6, 2, 3, 0]], [[6, 2, 3, 5]], [[4, 5, 0, 0]]])
    grams = add_ngrams(task, n=3, min_freq=2)
    assert grams.vocab[len(WORDS):] == ["not good", "very not", "very not good"]
    assert grams.max_len == 4 + 3 + 2
    assert names(grams, grams.train.ids[1, 0]) == ["very", "not", "good", "film", "very not", "not good",
                                                   "very not good"]
    assert torch.allclose(grams.embedding[-1], task.embedding[[6, 2, 3]].mean(0))


def test_padding_and_unk_never_join_a_gram_and_streams_stay_apart():
    task = toy_task([[[2, 3, 0], [3, 5, 0]], [[2, 1, 3], [3, 5, 0]], [[2, 3, 0], [0, 0, 0]]])
    grams = add_ngrams(task, n=2, min_freq=1)
    added = grams.vocab[len(WORDS):]
    assert sorted(added) == ["good film", "not good"]  # no "good good" across the two streams, no UNK pair
    assert not any("<unk>" in g or "<pad>" in g for g in added)
    assert names(grams, grams.train.ids[2, 1]) == []  # an empty stream stays empty


def test_order_one_is_the_words_themselves_and_bad_settings_say_what_works():
    task = toy_task([[[2, 3, 0, 0]]])
    assert add_ngrams(task, n=1, min_freq=5) is task
    with pytest.raises(DataError, match="order must be 1"):
        add_ngrams(task, n=4, min_freq=1)
    with pytest.raises(DataError, match="min_freq must be an integer ≥ 1"):
        add_ngrams(task, n=2, min_freq=0)


def test_config_refuses_an_order_it_cannot_build():
    from analog_ep.train.config import RunConfig, apply_overrides

    with pytest.raises(ConfigError, match="data.ngrams"):
        apply_overrides(RunConfig(), ["data.ngrams=5"])


@pytest.mark.realdata
def test_a_run_with_word_pairs_learns_their_vectors_and_evaluates_the_same(tmp_path, capsys):
    from analog_ep.cli import main
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.trainer import load_task_for, train_run
    from tests.analog.test_training import tiny_config

    cfg = tiny_config(**{"data.ngrams": 2, "model.learn_embeddings": "true", "train.embedding_lr": 3e-2})
    report = train_run(cfg, tmp_path / "run", progress=False)
    best, _ = load_model(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["config"]["data"]["ngrams"] == 2 and config["data_info"]["ngrams"]["added"]["2"] > 0
    assert best.spec.seq_len == 2 * cfg.data.max_len - 1
    assert best.embedding.shape[0] > len(load_task_for(tiny_config(), progress=False).vocab)  # words + pairs
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "test", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["test_accuracy"]


@pytest.mark.parametrize("norm", ["standardize", "whiten"])
def test_words_read_the_same_with_ngrams_and_a_gram_stays_the_mean_of_its_words(norm):
    from analog_ep.train.config import RunConfig, apply_overrides
    from analog_ep.train.trainer import model_embedding

    task = toy_task([[[2, 3, 5, 0]], [[2, 3, 4, 6]], [[4, 5, 6, 2]]])
    task.embedding.copy_(torch.randn(task.embedding.shape, generator=torch.Generator().manual_seed(0)))
    task.embedding[:2] = 0
    cfg = apply_overrides(RunConfig(), [f"model.input_norm={norm}"])
    grams = add_ngrams(task, n=2, min_freq=2)
    words, with_grams = model_embedding(cfg, task), model_embedding(cfg, grams)
    assert torch.allclose(with_grams[: len(WORDS)], words, atol=1e-6)
    assert torch.allclose(with_grams[-1], (words[2] + words[3]) / 2, atol=1e-6)  # "not good"
