"""Checkpoints are read with weights_only=True: a shared file cannot run code when it is opened."""

import os

import pytest
import torch

from analog_ep.cli import main
from analog_ep.errors import CheckpointError
from analog_ep.models import build_spec
from analog_ep.phi import EPNet
from analog_ep.train.checkpoint import convert_trusted_checkpoint, load_model, save_model


class _RunsCode:
    """Unpickling this object calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny() -> EPNet:
    return EPNet(build_spec("mlp", tiny=True, bias_offset=1.0), seed=0)


def test_a_checkpoint_whose_unpickling_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    net = _tiny()
    path = tmp_path / "evil.pt"
    save_model(path, net, payload=_RunsCode(str(marker)))
    with pytest.raises(CheckpointError, match="pickled Python object.*checkpoint-convert --trust"):
        load_model(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: an unsafe load of the same file does run its code
    assert marker.exists()


def test_plain_checkpoints_round_trip_with_weights_only(tmp_path):
    net = _tiny()
    save_model(tmp_path / "ok.pt", net, optimizer=torch.optim.Adam(net.parameters()).state_dict(),
               progress={"epoch": 1, "step": 3, "elapsed": 0.5}, rng=torch.get_rng_state())
    loaded, ckpt = load_model(tmp_path / "ok.pt")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    assert ckpt["progress"]["step"] == 3


def test_trusted_conversion_makes_an_old_style_checkpoint_loadable(tmp_path):
    import numpy as np

    net = _tiny()
    path = tmp_path / "old.pt"
    save_model(path, net, numpy_rng=np.random.default_rng(0).bit_generator.state["state"]["state"],
               extra_array=np.arange(3))
    with pytest.raises(CheckpointError, match="pickled"):
        load_model(path)
    assert main(["checkpoint-convert", str(path)]) == 2  # refuses without --trust
    assert main(["checkpoint-convert", "--trust", str(path), "--out", str(tmp_path / "new.pt")]) == 0
    loaded, ckpt = load_model(tmp_path / "new.pt")
    assert torch.equal(ckpt["extra_array"], torch.arange(3))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    convert_trusted_checkpoint(path)  # in place
    load_model(path)


def test_weights_round_trip_through_safetensors_into_a_run_directory(tmp_path):
    from analog_ep.train.weights_io import load_weights

    net = _tiny()
    run = tmp_path / "run"
    save_model(run / "checkpoints" / "best.pt", net)
    (run / "config.json").write_text('{"config": {"data": {"task": "imdb"}}}')
    assert main(["export-weights", str(run), str(tmp_path / "m.safetensors")]) == 0
    assert main(["import-weights", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "again")]) == 0
    again, _ = load_model(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    assert (tmp_path / "again" / "config.json").read_text().count('"task": "imdb"') == 1
    _, meta = load_weights(tmp_path / "m.safetensors")
    assert meta["spec"] == net.spec.to_dict()
    assert main(["import-weights", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "again")]) == 2


def test_a_foreign_or_corrupt_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from analog_ep.train.weights_io import load_weights

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="no seqep metadata"):
        load_weights(tmp_path / "foreign.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_weights(tmp_path / "bad.safetensors")
