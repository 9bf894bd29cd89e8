"""`seqep gdu`: how well do EP's updates match BPTT's gradients on this network (paper Fig. 2)?"""

from __future__ import annotations

import argparse
import json

import torch

from analog_ep.errors import ConfigError
from analog_ep.estimators import EPConfig
from analog_ep.gdu import gdu_curve, gdu_report, plot_gdu_curve
from analog_ep.models import MODELS, build_spec
from analog_ep.phi import EPNet

PAPER_PHASES = {"imdb": (0.1, 50, 25), "snli": (0.5, 60, 30), "mlp": (0.1, 50, 25)}

EPILOG = """\
examples:
  seqep gdu --model imdb --tiny --json              # seconds; the numbers the tests check
  seqep gdu --model snli --tiny --plot gdu.png      # per-step error curves, paper Fig. 2 style
  seqep gdu --model imdb --beta 0.01 --batch 4      # paper-sized IMDB network (minutes, ~3 GB)
  seqep gdu --model snli --tiny --vocab 50          # learned word vectors: the table is checked as a layer

Inputs are random Gaussian tokens: the check is about the dynamics, not the data. Angles near 0 mean
EP's update points where BPTT's gradient does; symmetric EP should beat two-phase EP at the same β.
Hard-sigmoid kinks bias finite-β EP: --bias-offset 1 starts units mid-range, off the kink.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gdu", help="compare EP / symmetric EP / C-EP updates with BPTT gradients",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", choices=sorted(MODELS), default="imdb")
    p.add_argument("--tiny", action="store_true", help="seconds-sized version of the network")
    p.add_argument("--beta", type=float, help="nudging strength (default: the paper's for the model)")
    p.add_argument("--free-steps", type=int, help="T1 (default: the paper's)")
    p.add_argument("--nudge-steps", type=int, help="K (default: the paper's)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bias-offset", type=float, default=1.0, help="initial bias shift (default 1.0)")
    p.add_argument("--schedule", choices=["alternating", "synchronous"], default="alternating")
    p.add_argument("--cep-lr", type=float, default=1e-6, help="C-EP step size for the comparison")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="also compute the per-step curve and plot it")
    p.add_argument("--vocab", type=int, default=0, metavar="N",
                   help="learn the word vectors: a table of N rows joins Φ's parameters and the inputs are random "
                        "token ids (the check then covers the table as its own layer, 'embedding')")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    beta, free, nudge = PAPER_PHASES[args.model]
    cfg = EPConfig(args.beta or beta, args.free_steps or free, args.nudge_steps or nudge)
    if args.vocab < 0 or 0 < args.vocab < 3:
        raise ConfigError(f"--vocab {args.vocab}: give 0 (random word vectors as inputs) or a table of ≥ 3 rows")
    spec = build_spec(args.model, tiny=args.tiny, bias_offset=args.bias_offset, schedule=args.schedule,
                      vocab_size=args.vocab)
    dtype = getattr(torch, args.dtype)
    net = EPNet(spec, seed=args.seed).to(dtype)
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.vocab:  # token ids (no padding) looked up in the net's own table
        x = torch.randint(1, args.vocab, (args.batch, spec.num_streams, spec.seq_len), generator=g)
    else:
        x = torch.randn(args.batch, spec.num_streams, spec.seq_len, spec.dim, generator=g).to(dtype)
    y = torch.randint(0, spec.num_classes, (args.batch,), generator=g)
    report = gdu_report(net, x, y, cfg, cep_lr=args.cep_lr)
    report["config"].update(model=args.model, tiny=args.tiny, seed=args.seed, dtype=args.dtype,
                            schedule=args.schedule, bias_offset=args.bias_offset, vocab=args.vocab)
    if args.plot:
        plot_gdu_curve(gdu_curve(net, x, y, cfg), args.plot)
        report["plot"] = args.plot
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"GDU check: {args.model}{' (tiny)' if args.tiny else ''}, β={cfg.beta}, T1={cfg.free_steps}, "
          f"K={cfg.nudge_steps}, batch {args.batch}, {args.dtype}")
    print(f"{'estimator':<14}{'angle vs BPTT':>15}   per-layer rel. RMS error")
    for name in ("ep_two_phase", "ep_symmetric", "cep"):
        layers = ", ".join(f"{k} {v['rel_rms_error']:.3g}" for k, v in report[name]["layers"].items())
        print(f"{name:<14}{report[name]['angle_deg']:>14.3f}°   {layers}")
    for warning in report["diagnostics"]["warnings"]:
        print(f"warning: {warning}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
