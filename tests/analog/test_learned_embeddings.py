"""Word vectors as a parameter of Φ: EP's contrast for the table equals BPTT's gradient, touches only the batch's
rows, and the trainer learns, saves and hands the table to every consumer of a run."""

from __future__ import annotations

import json

import pytest
import torch

from analog_ep import EPConfig, EPNet, build_spec
from analog_ep.embedding import PairFeatures, embed_batch
from analog_ep.estimators import bptt, cep, ep_symmetric, ep_two_phase
from analog_ep.gdu import angle_deg

VOCAB = 30


def learned_net(model: str, **options) -> EPNet:
    spec = build_spec(model, tiny=True, bias_offset=1.0, vocab_size=VOCAB, **options)
    net = EPNet(spec, seed=1).double()
    with torch.no_grad():
        net.embedding.mul_(0.6)
    return net


def token_ids(net: EPNet, batch: int = 6, padded: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, net.spec.num_streams, net.spec.seq_len), generator=g)
    if padded:
        ids[:, :, -padded:] = 0
    return ids


SHAPES = {
    "imdb_pooled": ("imdb", dict(pool_queries=3, mask_padding=True)),
    "snli_exact_match": ("snli", dict(exact_match=True, dim=9, mask_padding=True)),
    "mlp": ("mlp", {}),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_symmetric_ep_gives_bptt_gradient_for_the_table(shape):
    model, options = SHAPES[shape]
    net = learned_net(model, **options)
    ids = token_ids(net, padded=0 if model == "mlp" else 3)
    y = torch.arange(ids.shape[0]) % net.spec.num_classes
    cfg = EPConfig(beta=0.01, free_steps=300, nudge_steps=200)
    ep = ep_symmetric(net, ids, y, cfg, set_grad=False).grads["embedding"]
    ref = bptt(net, ids, y, cfg, truncate=None, set_grad=False).grads["embedding"]
    assert ref.abs().max() > 0
    assert angle_deg(ep, ref) < 0.1
    assert torch.allclose(ep, ref, rtol=0, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("estimator", [ep_two_phase, cep])
def test_one_sided_estimators_also_estimate_the_table(estimator):
    net = learned_net("imdb", pool_queries=3, mask_padding=True)
    ids = token_ids(net)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    cfg = EPConfig(beta=0.001, free_steps=200, nudge_steps=100)
    ref = bptt(net, ids, y, cfg, set_grad=False).grads["embedding"]
    args = (1e-6,) if estimator is cep else ()
    got = estimator(net, ids, y, cfg, *args, set_grad=False).grads["embedding"]
    assert angle_deg(got, ref) < 2.0


def test_the_contrast_touches_only_the_rows_of_the_batch_and_never_padding():
    net = learned_net("imdb", pool_queries=3, mask_padding=True)
    ids = token_ids(net)
    ids[ids == 7] = 8  # a word absent from the batch
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    grad = ep_symmetric(net, ids, y, EPConfig(beta=0.05, free_steps=60, nudge_steps=20), set_grad=False).grads
    moved = grad["embedding"].abs().sum(1) > 0
    assert not moved[0] and not moved[7]
    assert set(moved.nonzero().flatten().tolist()) == set(ids.unique().tolist()) - {0}


def test_token_ids_and_the_looked_up_vectors_relax_to_the_same_state():
    net = learned_net("snli", exact_match=True, dim=9, mask_padding=True)
    ids = token_ids(net)
    x = embed_batch(ids, net.embedding.detach(), PairFeatures(exact_match=True))
    a, b = net.prepare(ids), net.prepare(x)
    sa, sb = net.zero_state(6), net.zero_state(6)
    for _ in range(20):
        sa, sb = net.step(a, sa), net.step(b, sb)
    assert all(torch.equal(u, v) for u, v in zip(sa, sb))


def test_bad_token_inputs_are_refused_with_the_fix():
    net = learned_net("imdb", pool_queries=3)
    with pytest.raises(ValueError, match="token ids must lie in 0..29"):
        net.prepare(torch.full((1, 1, 12), VOCAB))
    with pytest.raises(ValueError, match="exact path"):
        net.prepare(token_ids(net), precision="bf16")
    plain = EPNet(build_spec("imdb", tiny=True), seed=0)
    with pytest.raises(ValueError, match="vocab_size"):
        plain.prepare(torch.zeros(1, 1, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size must be 0"):
        build_spec("imdb", tiny=True, vocab_size=2)
    with pytest.raises(ValueError, match="exact_match needs"):
        build_spec("imdb", tiny=True, exact_match=True)


def test_a_net_without_a_table_draws_the_same_initial_weights_as_before():
    plain = EPNet(build_spec("imdb", tiny=True), seed=3)
    learned = EPNet(build_spec("imdb", tiny=True, vocab_size=VOCAB), seed=3)
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(learned.named_parameters())[name])
    assert torch.equal(learned.embedding[0], torch.zeros(8))


def test_gdu_command_checks_the_table(capsys):
    from analog_ep.cli import main

    assert main(["gdu", "--model", "imdb", "--tiny", "--vocab", "40", "--beta", "0.001", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layer = report["ep_symmetric"]["layers"]["embedding"]
    assert layer["rel_rms_error"] < 1e-3 and layer["angle_deg"] < 0.1


@pytest.mark.realdata
def test_a_run_learns_the_vectors_saves_them_and_every_consumer_reads_them(tmp_path, capsys):
    from analog_ep.cli import main
    from analog_ep.train.checkpoint import load_model
    from analog_ep.train.trainer import Trainer, load_run_data, model_embedding
    from tests.analog.test_training import tiny_config

    cfg = tiny_config(**{"model.learn_embeddings": "true", "train.word_dropout": 0.1,
                         "train.embedding_decay": 1e-3, "train.embedding_lr": 3e-2})
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    trainer.setup()
    vectors = model_embedding(cfg, trainer.task)
    start = trainer.net.embedding.detach().clone()
    has_vector = (vectors != 0).any(1)
    assert torch.equal(start[has_vector], vectors[has_vector])  # starts from the vectors the model would read
    assert (start[1] != 0).any() and not start[0].any()  # UNK starts small and random (it can learn), PAD zero
    trainer.train()
    report = trainer.finish()
    trainer.close()
    assert report["precision"] == "fp32" and "learned word vectors" in report["precision_reason"]
    best, _ = load_model(tmp_path / "run")
    moved = (best.embedding.detach() != start).any(1)
    read = torch.zeros(len(start), dtype=torch.bool)
    read[trainer.task.train.ids.flatten().long()] = True
    assert moved.any() and not (moved & ~read).any()  # only rows the training split reads ever move
    assert not moved[0]  # padding
    _, _, vectors = load_run_data(tmp_path / "run", progress=False)
    assert torch.equal(vectors, best.embedding.detach())
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--split", "test", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["test_accuracy"]
    # shared as safetensors and rebuilt elsewhere, the table travels with the weights
    shared = tmp_path / "run.safetensors"
    assert main(["export-weights", str(tmp_path / "run"), str(shared)]) == 0
    assert main(["import-weights", "--out", str(tmp_path / "imported"), str(shared)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "imported"), "--split", "test", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == report["test_accuracy"]


@pytest.mark.realdata
def test_learned_vectors_refuse_the_fast_path_and_settings_without_them(tmp_path):
    from analog_ep.errors import ConfigError
    from analog_ep.train.trainer import Trainer
    from tests.analog.test_training import tiny_config

    with pytest.raises(ConfigError, match="model.learn_embeddings=true"):
        tiny_config(**{"train.embedding_lr": 1e-2})
    with pytest.raises(ConfigError, match="word_dropout"):
        tiny_config(**{"train.word_dropout": 1.0})
    trainer = Trainer(tiny_config(**{"model.learn_embeddings": "true", "ep.precision": "bf16"}), tmp_path / "r",
                      progress=False)
    with pytest.raises(ConfigError, match="exact path"):
        trainer.setup()


def test_a_zero_row_read_by_id_is_a_token_not_padding():
    net = learned_net("imdb", pool_queries=3, mask_padding=True)
    with torch.no_grad():
        net.embedding[5] = 0
    ids = token_ids(net)
    ids[:, :, 0] = 5
    assert net.prepare(ids).key_mask[:, :, 0].all()
    assert not net.prepare(ids).key_mask[:, :, -1].any()


def test_random_vectors_are_seeded_and_cover_the_training_words():
    from analog_ep.data.vectors import _random_vectors, parse_vectors
    from analog_ep.errors import DataError

    sentences = lambda: iter([["a", "b"], ["b", "c"]])  # noqa: E731
    one, two = _random_vectors(4, sentences, seed=3), _random_vectors(4, sentences, seed=3)
    assert list(one.index_to_key) == ["a", "b", "c"] and (one.vectors == two.vectors).all()
    assert parse_vectors("random:50", None).params == {"dim": 50}
    with pytest.raises(DataError, match="random:DIM"):
        parse_vectors("random:x", None)


def test_a_learned_table_fed_vectors_gets_no_gradient_and_stays():
    net = learned_net("imdb", pool_queries=3, mask_padding=True)
    ids = token_ids(net)
    x = embed_batch(ids, net.embedding.detach())
    estimate = ep_symmetric(net, x, torch.tensor([0, 1, 0, 1, 0, 1]), EPConfig(free_steps=30, nudge_steps=10))
    assert "embedding" not in estimate.grads and net.embedding.grad is None
    assert net.weights[0].grad is not None
