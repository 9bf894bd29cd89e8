"""Options and helpers shared by the spiking commands: unit flags, data flags, timesteps, the command line."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from analog_ep.errors import ConfigError, DataError
from spiking_ep.attention import ATTENTION_MODES
from spiking_ep.convert import SpikingNet, load_spiking
from spiking_ep.units import coding_names


def add_command(subparsers: argparse._SubParsersAction, name: str, help: str, description: str,
                epilog: str) -> argparse.ArgumentParser:
    """A subcommand whose epilog (examples) keeps its line breaks in --help; the description is wrapped here."""
    return subparsers.add_parser(name, help=help, description=textwrap.fill(description, 100), epilog=epilog,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


def add_unit_options(p: argparse.ArgumentParser) -> None:
    """--coding, --tau, --attention, --threshold, --seed: how the units communicate (override spiking.json)."""
    p.add_argument("--coding", choices=coding_names(), help="unit model (default: spiking.json's, else sigma_delta)")
    p.add_argument("--tau", type=float, help="synaptic trace time constant in steps (default 16)")
    p.add_argument("--attention", choices=ATTENTION_MODES, help="winner rule of the Hopfield layer")
    p.add_argument("--threshold", type=float, help="sigma-delta quantum θ (default 1/32)")
    p.add_argument("--seed", type=int, help="random seed of Bernoulli units / sampled attention")


def unit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The unit flags given, as `load_spiking` overrides (the sigma-delta quantum as coding_options)."""
    out: dict[str, Any] = {k: getattr(args, k) for k in ("coding", "tau", "attention", "seed")
                           if getattr(args, k) is not None}
    if args.threshold is not None:
        if (args.coding or "sigma_delta") != "sigma_delta":
            raise ConfigError("--threshold is the sigma-delta quantum: use it with --coding sigma_delta")
        out["coding_options"] = {"threshold": args.threshold}
    return out


def spiking_from_args(args: argparse.Namespace) -> SpikingNet:
    """The run's spiking network with spiking.json's options, overridden by the unit flags."""
    overrides = unit_overrides(args)
    snet = load_spiking(args.run_dir, **{k: v for k, v in overrides.items() if k != "coding_options"})
    if "coding_options" in overrides:
        snet = snet.with_options(coding_options=overrides["coding_options"])
    return snet


def add_timesteps_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--timesteps", default=default, help="comma-separated T values (default %(default)s)")


def parse_timesteps(text: str) -> list[int]:
    """'32,8,16' → [8, 16, 32]; a ConfigError for anything but integers ≥ 2."""
    try:
        timesteps = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--timesteps must be comma-separated integers, got {text!r}") from None
    if not timesteps or timesteps[0] < 2:
        raise ConfigError("--timesteps needs integers ≥ 2")
    return timesteps


def add_data_options(p: argparse.ArgumentParser) -> None:
    """--data, --synthetic, --split, --limit, --batch-size: which samples to run (see `batches_from_args`)."""
    p.add_argument("--data", metavar="FILE.pt", help='torch file with "x" (N,S,L,d) and "y" (N,)')
    p.add_argument("--synthetic", type=int, metavar="N", help="N Gaussian inputs, labels = analog predictions")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split of the run's data")
    p.add_argument("--limit", type=int, help="N samples only: a seeded random subset (splits are stored by label)")
    p.add_argument("--batch-size", type=int, default=128)


def batches_from_args(args: argparse.Namespace, snet: SpikingNet, analog_steps: int) -> Any:
    """Embedded (x, y) batches from --data FILE.pt, --synthetic N or the run's data split (--split, --limit);
    under torchrun this rank's run of whole batches of them (`spiking_ep.evaluate.shard_batches`)."""
    from spiking_ep.evaluate import batches_from_run, batches_from_tensors, shard_batches

    dtype = snet.net.weights[0].dtype
    if args.data:
        try:
            blob = torch.load(args.data, map_location="cpu", weights_only=True)
            x, y = blob["x"].to(dtype), blob["y"].long()
        except (OSError, KeyError, RuntimeError, TypeError) as err:
            raise DataError(f"cannot read {args.data} as a torch file with 'x' and 'y': {err}") from err
        if args.limit:
            x, y = x[:args.limit], y[:args.limit]
        return shard_batches(batches_from_tensors(x, y, args.batch_size))
    if args.synthetic:
        from analog_ep.dynamics import predict

        spec = snet.spec
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.synthetic, spec.num_streams, spec.seq_len, spec.dim, generator=g).to(dtype)
        y = predict(snet.net, x, analog_steps)  # of all N on every rank: the labels one process gives them
        return shard_batches(batches_from_tensors(x, y, args.batch_size))
    return batches_from_run(args.run_dir, args.split, args.limit, args.batch_size)


def command_line(args: argparse.Namespace) -> str:
    """The command that produced a report: sys.argv under the `seqep` script, else a note."""
    if Path(sys.argv[0]).name in ("seqep", "__main__.py"):
        return "seqep " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return f"seqep {getattr(args, 'command', '?')} {getattr(args, 'run_dir', '')} (via analog_ep.cli.main)".strip()
