"""The spiking trainer's public names where the commands import them from (code: `spiking_ep.train`'s modules)."""

from analog_ep.train.lifecycle import Progress  # noqa: F401
from spiking_ep.train import *  # noqa: F403
from spiking_ep.train import __all__  # noqa: F401
