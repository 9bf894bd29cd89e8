"""Run configuration: four typed sections, loaded from TOML presets, validated, overridable.

Presets live in `experiments/presets/<task>-<preset>.toml` (e.g. `imdb-cpu.toml`). Every value can be
overridden from the command line with `--set section.key=value` (or `--set key=value` when the key
name is unique across sections); values are parsed as TOML literals (`--set train.lrs=[1e-3,5e-4]`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analog_ep.data.ngrams import check_ngram_args
from analog_ep.embedding import PairFeatures
from analog_ep.errors import ConfigError, DataError
from analog_ep.estimators import BETA_SIGNS, ESTIMATORS, training_beta_sign
from analog_ep.fast.folded import REQUESTS as FOLD_REQUESTS
from analog_ep.fast.precision import REQUESTS as PRECISION_REQUESTS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(os.environ.get("SEQEP_PRESET_DIR", Path(__file__).resolve().parents[2] / "experiments" / "presets"))
PRESETS = ("smoke", "cpu", "paper")


@dataclass
class DataConfig:
    task: str = "imdb"
    data_dir: str | None = None
    max_len: int | None = None  # None: the task's default (IMDB 600, SNLI 25 per sentence)
    vectors: str = "glove50"
    oov: str = "drop"
    min_freq: int = 1
    max_vocab: int | None = None
    val_size: float = 0.1
    train_limit: int | None = None
    eval_limit: int | None = None
    exact_match: bool = False  # sentence pairs: one more input channel, 1 where the word is in the other sentence
    alignment: bool = False  # sentence pairs: 1 + d more channels, similarity and difference to the aligned word
    alignment_temperature: float = 10.0  # softmax(temperature · cosine) aligns a token to the other sentence
    ngrams: int = 1  # 2 or 3: the training split's frequent word n-grams become tokens of their own (data/ngrams.py)
    ngram_min_freq: int = 3  # an n-gram joins the vocabulary when it occurs this often in the training split

    @property
    def pair_features(self) -> PairFeatures:
        """The channels appended to each token of a sentence pair (`embedding.PairFeatures`)."""
        return PairFeatures(self.exact_match, self.alignment, self.alignment_temperature)

    def extra_channels(self, dim: int) -> int:
        """Input channels per token beyond its `dim`-wide word vector (the pair features)."""
        return self.pair_features.channels(dim)


@dataclass
class ModelConfig:
    hidden: list[int] = field(default_factory=lambda: [1000, 40])
    attention: bool = True
    gamma: float | None = None  # None: 1/sqrt(d) for IMDB, 0.16 for SNLI
    mask_padding: bool = False
    pool_queries: int = 0
    input_norm: str = "none"  # "standardize" each dimension or "whiten" (ZCA), train-token-frequency weighted
    input_scale: float | None = None  # None: auto, word-vector entries scaled to RMS 0.6 (GloVe-50's own)
    bias_offset: float = 1.0
    init_gain: float = 1.0
    schedule: str = "alternating"
    learn_embeddings: bool = False  # the word vectors become a parameter of Φ, initialised from data.vectors and
    # learned by the run's estimator (EP: the local contrast of the phases, scattered onto the batch's token rows)


@dataclass
class EPSection:
    estimator: str = "ep_symmetric"
    beta: float = 0.1
    free_steps: int = 50
    nudge_steps: int = 25
    tol: float | None = None
    eval_free_steps: int | None = None  # None: free_steps
    eval_tol: float | None = None
    precision: str = "auto"  # "auto": the fastest faithful mode on this machine, from a short measured calibration
    # (analog_ep/fast/precision.py); "fp32": the exact path; "bf16": the fast path (bf16 products, nudged phases as
    # differences; docs/benchmarks.md); "int8": the fast path with the large FC products in int8 (our AMX kernels:
    # refused on a CPU without them, where "int8-library" runs oneDNN's int8 kernels anyway, very slowly; likewise
    # "bf16" is refused on a CPU without bf16 instructions, where "bf16-emulated" runs it anyway)
    fold_keys: str = "auto"  # "auto": relax with the first synapse folded onto each sequence's distinct keys where
    # that saves enough multiply-adds (exact path on the CPU, EP estimators, and every run's evaluation; SNLI's
    # presets; analog_ep/fast/folded.py); "on": wherever it can run; "off": never
    beta_sign: str = "auto"  # one-sided nudges (ep_two_phase, cep): "random" draws ±β per batch from the run's
    # seed, cancelling the O(β) bias on average; "positive": always +β; "auto": the estimator's default (positive
    # for both; docs/results.md, "Estimators on the smoke preset"); other estimators refuse anything but auto


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adam"
    lrs: list[float] = field(default_factory=lambda: [1e-4, 5e-5, 5e-5, 5e-5])
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    min_lr: float = 1e-5
    seed: int = 0
    max_minutes: float | None = None
    checkpoint_minutes: float = 5.0
    checkpoint_every: int | None = None  # also write last.pt every N optimiser steps (None: by time only)
    device: str = "cpu"
    dtype: str = "float32"
    log_every: int = 20
    embedding_lr: float | None = None  # learned word vectors' learning rate (None: the first layer's, lrs[0])
    embedding_decay: float = 0.0  # L2 pull of the learned word vectors towards their initial values, applied
    # only to the rows of the batch's tokens (rows never read are never touched)
    word_dropout: float = 0.0  # fraction of a training batch's tokens replaced by padding (inputs only: EP-safe)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ep: EPSection = field(default_factory=EPSection)
    train: TrainConfig = field(default_factory=TrainConfig)

    SECTIONS = ("data", "model", "ep", "train")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> RunConfig:
        unknown = set(raw) - set(cls.SECTIONS)
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; allowed: {list(cls.SECTIONS)}")
        cfg = cls()
        for name in cls.SECTIONS:
            section = raw.get(name) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{source}: [{name}] must be a table of key = value pairs, not {section!r}")
            for key, value in section.items():
                set_value(cfg, name, key, value, source)
        validate(cfg, source)
        return cfg


CHOICES = {
    ("data", "task"): ("imdb", "snli"),
    ("data", "oov"): ("drop", "unk"),
    ("model", "schedule"): ("alternating", "synchronous"),
    ("model", "input_norm"): ("none", "standardize", "whiten"),
    ("ep", "estimator"): ESTIMATORS,
    ("ep", "precision"): PRECISION_REQUESTS,
    ("ep", "fold_keys"): FOLD_REQUESTS,
    ("ep", "beta_sign"): ("auto", *BETA_SIGNS),
    ("train", "optimizer"): ("adam", "adam_unfused", "sgd"),
    ("train", "lr_schedule"): ("cosine", "constant"),
    ("train", "dtype"): ("float32", "float64", "bfloat16"),
}
POSITIVE = {("ep", "beta"), ("ep", "free_steps"), ("ep", "nudge_steps"), ("train", "epochs"),
            ("train", "batch_size"), ("train", "eval_batch_size"), ("train", "log_every")}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def set_value(cfg: RunConfig, section: str, key: str, value: Any, source: str = "config") -> None:
    obj = getattr(cfg, section)
    hints = typing.get_type_hints(type(obj))
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}; allowed in [{section}]: {sorted(hints)}")
    if not _type_ok(value, hints[key]):
        raise ConfigError(f"{source}: {section}.{key} = {value!r} has the wrong type; expected {hints[key]}")
    if hints[key] is float or (isinstance(value, int) and float in typing.get_args(hints[key])):
        value = float(value) if value is not None else None
    if isinstance(value, list) and typing.get_args(hints[key]) == (float,):
        value = [float(v) for v in value]
    setattr(obj, key, value)


def _is_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


def validate(cfg: RunConfig, source: str = "config") -> None:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{source}: {section}.{key} = {value!r}; choose one of {list(allowed)}")
    for section, key in POSITIVE:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{source}: {section}.{key} must be > 0")
    try:
        training_beta_sign(cfg.ep.estimator, cfg.ep.beta_sign)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    if not isinstance(cfg.train.device, str) or not _is_device(cfg.train.device):
        raise ConfigError(f"{source}: train.device = {cfg.train.device!r} is not a torch device; use cpu, cuda or "
                          "cuda:N")
    for key in ("exact_match", "alignment"):
        if getattr(cfg.data, key) and cfg.data.task != "snli":
            raise ConfigError(f"{source}: data.{key} needs sentence pairs (task snli), not {cfg.data.task!r}")
    if cfg.data.alignment and cfg.model.learn_embeddings:
        raise ConfigError(f"{source}: data.alignment compares frozen word vectors; with model.learn_embeddings "
                          "the alignment would have to follow the table as it learns (not built): set one of them "
                          "false")
    if cfg.data.alignment_temperature <= 0:
        raise ConfigError(f"{source}: data.alignment_temperature must be > 0")
    try:
        check_ngram_args(cfg.data.ngrams, cfg.data.ngram_min_freq)
    except DataError as err:
        raise ConfigError(f"{source}: data.ngrams / data.ngram_min_freq: {err}") from None
    if cfg.train.checkpoint_every is not None and cfg.train.checkpoint_every <= 0:
        raise ConfigError(f"{source}: train.checkpoint_every must be > 0 steps, or none (checkpoint by time only)")
    if any(n <= 0 for n in cfg.model.hidden):
        raise ConfigError(f"{source}: model.hidden sizes must be > 0, got {cfg.model.hidden}")
    if not 0.0 <= cfg.train.word_dropout < 1.0:
        raise ConfigError(f"{source}: train.word_dropout = {cfg.train.word_dropout} must be in [0, 1)")
    if cfg.train.embedding_decay < 0 or (cfg.train.embedding_lr is not None and cfg.train.embedding_lr < 0):
        raise ConfigError(f"{source}: train.embedding_lr and train.embedding_decay must be ≥ 0")
    if (cfg.train.embedding_lr is not None or cfg.train.embedding_decay) and not cfg.model.learn_embeddings:
        raise ConfigError(f"{source}: train.embedding_lr / train.embedding_decay apply to learned word vectors: "
                          "add --set model.learn_embeddings=true, or leave them unset")
    if any(lr < 0 for lr in cfg.train.lrs) or not cfg.train.lrs:
        raise ConfigError(f"{source}: train.lrs must be one or more non-negative learning rates")


def parse_override(text: str) -> tuple[str | None, str, Any]:
    """'section.key=value' or 'key=value' → (section or None, key, parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set ep.beta=0.2")
    path, raw = text.split("=", 1)
    section, _, key = path.strip().rpartition(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # bare words are strings: --set data.vectors=w2v:300
    if raw.strip().lower() in ("none", "null"):
        value = None
    return section or None, key, value


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    for text in overrides:
        section, key, value = parse_override(text)
        if section is None:
            owners = [s for s in cfg.SECTIONS if key in typing.get_type_hints(type(getattr(cfg, s)))]
            if len(owners) != 1:
                raise ConfigError(f"--set {text!r}: key {key!r} is {'ambiguous' if owners else 'unknown'}; "
                                  f"write it as section.key (sections: {list(cfg.SECTIONS)})")
            section = owners[0]
        if section not in cfg.SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; sections: {list(cfg.SECTIONS)}")
        set_value(cfg, section, key, value, source=f"--set {text}")
    validate(cfg, "--set")
    return cfg


def preset_path(task: str, preset: str) -> Path:
    return PRESET_DIR / f"{task}-{preset}.toml"


def load_toml(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return RunConfig.from_dict(raw, source=str(path))


def load_preset(task: str, preset: str) -> RunConfig:
    path = preset_path(task, preset)
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise ConfigError(f"no preset {preset!r} for task {task!r} ({path}); available: {available}")
    cfg = load_toml(path)
    if cfg.data.task != task:
        raise ConfigError(f"{path} is a preset for task {cfg.data.task!r}, not {task!r}")
    return cfg
