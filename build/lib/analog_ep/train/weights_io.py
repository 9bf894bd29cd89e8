"""Model weights as safetensors: the format the ecosystem shares weights in, with no code inside.

A `.safetensors` file holds the model's tensors plus string metadata: the graph spec and, when exported
from a run directory, the run's config.json, so `import_weights` can rebuild a run directory that
`seqep evaluate`, `convert`, `compare` and `export-nir` read like any trained run.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from analog_ep.models import build_spec
    >>> from analog_ep.phi import EPNet
    >>> net = EPNet(build_spec("mlp", tiny=True), seed=0)
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> save_weights(net, path)
    >>> again, meta = load_weights(path)
    >>> all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analog_ep.errors import CheckpointError
from analog_ep.phi import EPNet, GraphSpec
from analog_ep.train.checkpoint import BEST, load_model, save_model

FORMAT = "seqep-weights-1"


def save_weights(net: EPNet, path: str | Path, config: dict[str, Any] | None = None) -> None:
    """Write the weights of `net` (and optionally its run's config.json) as one .safetensors file."""
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "spec": json.dumps(net.spec.to_dict())}
    if config is not None:
        meta["run_config"] = json.dumps(config)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_weights(path: str | Path) -> tuple[EPNet, dict[str, Any]]:
    """(EPNet, metadata) from a .safetensors file written by `save_weights`; a clear error otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({err})") from None
    if meta.get("format") != FORMAT or "spec" not in meta:
        raise CheckpointError(f"{path} has no seqep metadata (format {FORMAT!r} with a 'spec'): it was not "
                              "written by `seqep export-weights`")
    try:
        net = EPNet(GraphSpec.from_dict(json.loads(meta["spec"])))
        net.load_state_dict(state)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: its weights do not fit its spec ({err})") from None
    meta = {k: json.loads(v) if k in ("spec", "run_config") else v for k, v in meta.items()}
    return net, meta


def export_run(source: str | Path, out: str | Path, which: str = BEST) -> Path:
    """A run directory's (or checkpoint's) model → `out` .safetensors, with the run's config when present."""
    source = Path(source)
    net, _ = load_model(source, which)
    config_file = source / "config.json" if source.is_dir() else None
    config = json.loads(config_file.read_text()) if config_file is not None and config_file.is_file() else None
    save_weights(net, out, config)
    return Path(out)


def import_run(path: str | Path, out_dir: str | Path) -> Path:
    """A .safetensors file → a run directory (config.json + checkpoints/best.pt) the other commands read."""
    from analog_ep.train.run_dir import write_json

    net, meta = load_weights(path)
    out_dir = Path(out_dir)
    if (out_dir / "checkpoints" / BEST).exists():
        raise CheckpointError(f"{out_dir} already holds a model: import into a new directory")
    if "run_config" in meta:
        write_json(out_dir / "config.json", meta["run_config"])
    save_model(out_dir / "checkpoints" / BEST, net, imported_from=str(path))
    return out_dir
