"""EP on a GPU at the paper's shapes: seconds per training batch and the update's fidelity, as one JSON.

Why: `seqep bench` measures this CPU (its peaks, RSS and the native kernels are CPU things); this probe checks
that the same estimators run on CUDA and how fast, on whatever GPU is at hand. Per shape and batch: the
fast path (`--precision`, bf16 by default: int8 is CPU-only), the exact fp32 path, and the
reference-equivalent mode (autograd on Φ every step, fp32, phases in turn), each the mean of `--repeats`
batches after 2 warm-ups, timed with the device synchronised; the EP update's angle to the float64 update
(fast and exact fp32), and the exact update's angle to the same update computed on the CPU. Random
Gaussian inputs (no data needed), random weights, seed 0, as `seqep bench --inputs random` builds them.
`--cuda-graphs both` times the fast and exact paths also with each relaxation step replayed as a CUDA graph
(`analog_ep.fast.step_graph`), side by side with the plain loop, and checks that both give the same update.

    python experiments/gpu_probe.py --device cuda --cuda-graphs both --out runs/gpu_probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from analog_ep.bench import SHAPES, Shape, build_shape, count_flops, flat_grads, make_net, random_batch
from analog_ep.estimators import EPConfig, ep_symmetric
from analog_ep.fast import step_graph
from analog_ep.gdu import angle_deg
from analog_ep.phi import enable_compiled_kernels
from analog_ep.reference import reference_ep_symmetric

DEFAULT_BATCHES = {"imdb-paper": [32, 128], "snli-paper": [256]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def measure_batch(shape: Shape, b: int, fast_cfg: EPConfig, exact_cfg: EPConfig, device: torch.device,
                  repeats: int, graphs: tuple[bool, ...] = (False,)) -> dict:
    """Seconds per training batch of the fast path, the exact path (each with the plain loop and, as asked, with
    CUDA graphs: `…_graphs_s`) and the reference-equivalent mode."""
    x, y = (t.to(device) for t in random_batch(shape.spec, b))
    net, ref_net = make_net(shape).to(device), make_net(shape, reference=True).to(device)
    rec: dict = {"batch": b}
    with torch.no_grad():
        for key, cfg in (("fast", fast_cfg), ("exact", exact_cfg)):
            updates = {}
            for graphed in graphs:
                step_graph.ENABLED = graphed
                name = f"{key}_graphs_s" if graphed else f"{key}_s"
                rec[name] = _timed(lambda cfg=cfg: ep_symmetric(net, x, y, cfg, set_grad=False), device, repeats)
                updates[graphed] = flat_grads(ep_symmetric(net, x, y, cfg, set_grad=False).grads)
            step_graph.ENABLED = False
            if len(updates) == 2:  # the same arithmetic: the same update, to the bit
                rec[f"{key}_graphs_max_abs_diff"] = float((updates[True] - updates[False]).abs().max())
    rec["reference_s"] = _timed(lambda: reference_ep_symmetric(ref_net, x, y, shape.beta, shape.free_steps,
                                                               shape.nudge_steps), device, repeats)
    for key in ("fast_s", "fast_graphs_s"):
        if key in rec:
            rec[key.replace("fast", "speedup_vs_reference").removesuffix("_s")] = rec["reference_s"] / rec[key]
    if len(graphs) == 2:
        rec["graphs_speedup"] = rec["fast_s"] / rec["fast_graphs_s"]
    best = min(rec[key] for key in ("fast_s", "fast_graphs_s") if key in rec)
    rec["fast_tflops"] = count_flops(shape.spec, b, shape.free_steps, shape.nudge_steps)["total"] / best / 1e12
    if device.type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    print(json.dumps(rec), flush=True)
    return rec


def probe_shape(name: str, batches: list[int], precision: str, device: torch.device, repeats: int,
                graphs: tuple[bool, ...] = (False,)) -> dict:
    shape = build_shape(name)
    fast_cfg = EPConfig(shape.beta, shape.free_steps, shape.nudge_steps, precision=precision)
    exact_cfg = EPConfig(shape.beta, shape.free_steps, shape.nudge_steps, precision="fp32")
    out: dict = {"shape": name, "results": [measure_batch(shape, b, fast_cfg, exact_cfg, device, repeats, graphs)
                                            for b in batches]}
    net = make_net(shape).to(device)
    x, y = (t.to(device) for t in random_batch(shape.spec, 4, seed=2))
    with torch.no_grad():
        g64 = ep_symmetric(copy.deepcopy(net).double(), x.double(), y, exact_cfg, set_grad=False).grads
        fast = ep_symmetric(net, x, y, fast_cfg, set_grad=False).grads
        exact = ep_symmetric(net, x, y, exact_cfg, set_grad=False).grads
    out["angle_deg"] = angle_deg(flat_grads(fast), flat_grads(g64))
    out["fp32_exact_angle_deg"] = angle_deg(flat_grads(exact), flat_grads(g64))
    if device.type != "cpu":  # the same exact update on the CPU: does the device compute what the CPU does?
        cpu = ep_symmetric(net.cpu(), x.cpu(), y.cpu(), exact_cfg, set_grad=False).grads
        out["exact_angle_to_cpu_deg"] = angle_deg(flat_grads(exact).cpu(), flat_grads(cpu))
    print(json.dumps({k: v for k, v in out.items() if k.endswith("_deg")}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--shape", action="append", choices=SHAPES, help="repeatable (default imdb-paper, snli-paper)")
    p.add_argument("--batch", type=int, action="append", help="repeatable (default: 32 and 128 at IMDB, 256 at SNLI)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="fast path precision")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cuda-graphs", choices=["off", "on", "both"], default="off",
                   help="relaxation steps replayed as CUDA graphs: off (default), on, or both side by side")
    p.add_argument("--out", help="write the JSON report here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is visible; use --device cpu (or seqep bench, which measures the CPU properly)")
    if args.cuda_graphs != "off" and device.type != "cuda":
        p.error("--cuda-graphs needs --device cuda")
    graphs = {"off": (False,), "on": (True,), "both": (False, True)}[args.cuda_graphs]
    enable_compiled_kernels(args.precision != "fp32")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "precision": args.precision, "repeats": args.repeats,
              "cuda_graphs": args.cuda_graphs, "shapes": []}
    for name in args.shape or list(DEFAULT_BATCHES):
        report["shapes"].append(probe_shape(name, args.batch or DEFAULT_BATCHES.get(name, [32]), args.precision,
                                            device, args.repeats, graphs))
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
