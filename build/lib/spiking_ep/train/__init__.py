"""Training with spikes: spike-driven EP / C-EP epochs on a `SpikingNet`, written like an analog run.

    config.py     SpikingTrainConfig and the estimator / coding choices
    splits.py     data splits as batches (in-memory tensors or a run's data set)
    estimator.py  the spiking estimators and the spiking evaluation of a split
    loop.py       fit_spiking: the epochs, last.pt / metrics through analog_ep.train.lifecycle, stop on signals
    report.py     report.json's numbers and the plots
    resume.py     what --resume continues with (the run's config, flags checked against it)
    runs.py       finetune_spiking / train_spiking_from_scratch on run directories
"""

from spiking_ep.train.config import (
    ANALOG_TO_SPIKING,
    CONTROL_ESTIMATOR,
    LEARNING_CODINGS,
    LIMIT_DEFAULTS,
    RESUMABLE_CHANGES,
    SPIKING_ESTIMATORS,
    SpikingTrainConfig,
)
from spiking_ep.train.estimator import Estimator, spikes_per_sample, spiking_accuracy, spiking_estimator
from spiking_ep.train.loop import analog_free_phase_trace, fit_spiking, train_epoch
from spiking_ep.train.resume import read_resumable, refuse_changes, resume_options
from spiking_ep.train.runs import finetune_spiking, train_spiking_from_scratch
from spiking_ep.train.splits import Batch, Split, Splits, dataset_split, epoch_order, tensor_split

__all__ = [
    "ANALOG_TO_SPIKING", "CONTROL_ESTIMATOR", "LEARNING_CODINGS", "LIMIT_DEFAULTS", "RESUMABLE_CHANGES",
    "SPIKING_ESTIMATORS", "Batch", "Estimator", "Split", "SpikingTrainConfig", "Splits", "analog_free_phase_trace",
    "dataset_split", "epoch_order", "finetune_spiking", "fit_spiking", "read_resumable", "refuse_changes",
    "resume_options", "spikes_per_sample", "spiking_accuracy", "spiking_estimator", "tensor_split",
    "train_epoch", "train_spiking_from_scratch",
]
