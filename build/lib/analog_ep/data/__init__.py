"""The dataset pipeline shared by both backends: IMDB and SNLI as token ids plus one frozen embedding.

    from analog_ep.data import load_task

    from analog_ep.data import embed_batch
    task = load_task("imdb")                     # SEQEP_DATA_DIR, else the Hugging Face hub
    x = embed_batch(ids, task.embedding)         # (B, S, L) ids -> (B, S, L, d), padding exactly zero
    task = add_ngrams(task, n=2, min_freq=3)     # frequent word pairs become tokens of their own

See docs/data.md for sources, the cache and every field of ``TaskData.info``.
"""

from analog_ep.data.dataset import SequenceDataset, TaskData, embed_batch, exact_match_flags
from analog_ep.data.ngrams import add_ngrams
from analog_ep.data.sources import resolve_data_dir
from analog_ep.data.task import load_task

__all__ = ["SequenceDataset", "TaskData", "add_ngrams", "embed_batch", "exact_match_flags", "load_task",
           "resolve_data_dir"]
