"""The GDU check gives finite numbers or refuses with the reason; saturation is diagnosed, not hidden."""

import math

import pytest
import torch

from analog_ep.cli import main
from analog_ep.estimators import EPConfig
from analog_ep.gdu import GDUUndefinedError, gdu_report, saturation
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from tests.helpers import random_inputs


def _snli_tiny(bias_offset: float) -> EPNet:
    return EPNet(build_spec("snli", tiny=True, bias_offset=bias_offset, schedule="synchronous"), seed=0).double()


def test_saturation_counts_units_on_the_clamp_boundaries():
    state = [torch.tensor([[0.0, 0.5, 1.0, 0.25]]), torch.tensor([[0.0, 0.0]])]
    assert saturation(state) == [0.5, 1.0]


def test_an_all_saturated_output_is_refused_with_the_reason_not_nan():
    """Output biases far below zero: every output unit sits at 0, BPTT's gradient is exactly zero (0/0 angle)."""
    net = _snli_tiny(0.0)
    with torch.no_grad():
        net.biases[-1].fill_(-100.0)
    x, y = random_inputs(net.spec, 2)
    with pytest.raises(GDUUndefinedError, match="exactly zero.*100 % of the output units.*--bias-offset 1"):
        gdu_report(net, x, y, EPConfig(0.5, 60, 30))


def test_saturated_outputs_warn_and_a_small_beta_restores_agreement():
    """The paper's initialisation (bias offset 0) leaves output units at 0: β = 0.5 disagrees, β = 0.005 agrees."""
    net = _snli_tiny(0.0)
    x, y = random_inputs(net.spec, 2)
    big = gdu_report(net, x, y, EPConfig(0.5, 60, 30))
    small = gdu_report(net, x, y, EPConfig(0.005, 60, 30))
    assert big["diagnostics"]["saturated_fraction"]["out"] > 0
    assert any("saturated" in w for w in big["diagnostics"]["warnings"])
    assert all(math.isfinite(r[k]["angle_deg"]) for r in (big, small) for k in ("ep_two_phase", "ep_symmetric"))
    assert small["ep_symmetric"]["angle_deg"] < 1.0 < big["ep_symmetric"]["angle_deg"]


def test_gdu_command_prints_the_saturation_warning(capsys):
    code = main(["gdu", "--model", "snli", "--tiny", "--batch", "2", "--bias-offset", "0", "--schedule", "synchronous",
                 "--free-steps", "40", "--nudge-steps", "10"])
    out = capsys.readouterr().out
    assert code == 0 and "warning:" in out and "nan" not in out
