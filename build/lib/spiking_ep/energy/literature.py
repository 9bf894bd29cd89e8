"""Published break-even points of spiking vs conventional networks, and where a measured network stands.

Our own break-even rate (`pricing.compare`) uses this repository's prices; these thresholds come from
hardware studies that also count memory accesses, so a report shows both:

- Dampfhoffer et al., "Are SNNs really more energy-efficient than ANNs? An in-depth hardware-aware
  study", IEEE TETCI 2023: a rate-coded SNN beats the ANN on the same silicon only at about
  0.15–1.38 spikes per synapse per inference (the range over the architectures studied).
- Yan et al., arXiv 2409.08290: against an ANN quantised to ⌈log₂(T+1)⌉ bits at T = 5, the SNN needs a
  spike rate below about 5.7 % (spikes per neuron and timestep).

Example:
    >>> spikes_per_synapse_verdict(0.1)["verdict"], spikes_per_synapse_verdict(3.0)["verdict"]
    ('below', 'above')
    >>> spike_rate_verdict(0.02)["verdict"]
    'below'
"""

from __future__ import annotations

from typing import Any

DAMPFHOFFER_SPIKES_PER_SYNAPSE = (0.15, 1.38)  # spikes per synapse per inference: break-even range
YAN_SPIKE_RATE = 0.057  # spikes per neuron and timestep, vs a ⌈log₂(T+1)⌉-bit ANN at T = 5
DAMPFHOFFER = "Dampfhoffer et al., IEEE TETCI 2023"
YAN = "Yan et al., arXiv 2409.08290"


def spikes_per_synapse_verdict(spikes_per_synapse: float) -> dict[str, Any]:
    """'below' the range (an SNN of this activity beat the ANN in every architecture studied), 'within'
    (it did in some), 'above' (in none)."""
    low, high = DAMPFHOFFER_SPIKES_PER_SYNAPSE
    verdict = "below" if spikes_per_synapse < low else "within" if spikes_per_synapse <= high else "above"
    return {"value": spikes_per_synapse, "threshold": [low, high], "verdict": verdict, "source": DAMPFHOFFER}


def spike_rate_verdict(rate: float) -> dict[str, Any]:
    """'below' the rate that beats a low-bit ANN, or 'above' it."""
    return {"value": rate, "threshold": YAN_SPIKE_RATE, "verdict": "below" if rate < YAN_SPIKE_RATE else "above",
            "source": YAN}


def verdict_text(entry: dict[str, Any]) -> str:
    """One table cell: 'above (> 1.38)', 'within (0.15–1.38)', 'below (< 5.7 %)'."""
    threshold = entry["threshold"]
    if isinstance(threshold, list):
        low, high = threshold
        bound = {"below": f"< {low:g}", "within": f"{low:g}–{high:g}", "above": f"> {high:g}"}[entry["verdict"]]
    else:
        bound = f"{'<' if entry['verdict'] == 'below' else '≥'} {100 * threshold:.1f} %"
    return f"{entry['verdict']} ({bound})"
