"""Spiking backend: runs analog_ep's Φ with rate-coded spiking units (docs/spiking.md).

    from spiking_ep import to_spiking

    from spiking_ep import evaluate_spiking
    snet = to_spiking("runs/imdb")                     # or an EPNet; coding="sigma_delta" | "if" | ...
    result = evaluate_spiking(snet, batches, timesteps=(32, 64, 128, 256))

Learning from spikes: `spiking_ep.learning.spiking_ep_symmetric` / `spiking_cep`. Your own unit model:
`register_coding(name, factory)`; your own energy prices: `register_profile(profile_or_toml)`.
"""

from spiking_ep.convert import SpikingNet, load_spiking, save_spiking_config, to_spiking
from spiking_ep.dynamics import SpikeRecord, SpikingState, run_phase, spiking_free_phase, spiking_step
from spiking_ep.energy.pricing import register_profile
from spiking_ep.evaluate import evaluate_spiking, plot_accuracy_vs_timesteps
from spiking_ep.units import register_coding

__all__ = [
    "SpikeRecord", "SpikingNet", "SpikingState", "evaluate_spiking", "load_spiking", "plot_accuracy_vs_timesteps",
    "register_coding", "register_profile", "run_phase", "save_spiking_config", "spiking_free_phase", "spiking_step",
    "to_spiking",
]
