"""Errors a user can act on: the CLI prints their message (no traceback) and exits with status 2."""


class SeqepError(Exception):
    """Base class: the message must say what went wrong and how to fix it."""


class DataError(SeqepError):
    """Missing, malformed or inconsistent data sets, splits or word vectors."""


class ConfigError(SeqepError):
    """Unknown keys or bad values in a preset, a `--set` override or a command-line flag."""


class CheckpointError(SeqepError):
    """A checkpoint that is missing, corrupt or incompatible with the requested model."""


class NumericalError(SeqepError):
    """NaN or Inf in a relaxation or an update: the message names the layer, phase and step, and what to try."""
