"""Where one relaxation step's time goes on the fast path, free and nudged, at a benchmark shape.

Why: before building a lever, see which kernels own the step. Times 10 steps of each phase from
random weights (as `seqep bench` builds them) on the batch `seqep bench` would time (`--inputs`: real
reviews or sentence pairs where the data is found, else random vectors) and prints torch.profiler's table
of the top operators. The profiler inflates small kernels (SNLI's batched products most): trust the
unprofiled ms per step it prints first.

    python experiments/profile_step.py --shape imdb-paper --batch 32 [--precision int8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from analog_ep.bench import INPUTS, SHAPES, bench_batch, build_shape, make_net, resolve_inputs
from analog_ep.dynamics import relax
from analog_ep.fast.allocator import keep_freed_memory
from analog_ep.phi import enable_compiled_kernels, one_hot_target, signed_coef


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="imdb-paper", choices=SHAPES)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=12, help="operators shown per phase")
    p.add_argument("--precision", choices=["bf16", "int8"], default="bf16", help="fast path precision (default bf16)")
    p.add_argument("--inputs", choices=INPUTS, default="auto", help="as `seqep bench --inputs` (default auto)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    enable_compiled_kernels(True)
    shape = build_shape(args.shape)
    net = make_net(shape)
    inputs_kind = resolve_inputs(args.inputs, args.shape)
    x, y = bench_batch(shape, args.batch, inputs_kind)
    print(f"{args.shape}, batch {args.batch}, {args.precision}, {inputs_kind} inputs")
    b = args.batch
    with torch.no_grad():
        inputs = net.prepare(x, args.precision)
        free, _ = relax(net, inputs, net.zero_state(b), 10, track=False)
        nudged_inputs, start = net.nudge_start(inputs, free, times=2)
        betas = signed_coef(b, shape.beta, free[-1]).view(-1, 1)  # +β rows then −β rows, as ep_symmetric
        target = one_hot_target(torch.cat([y, y]), shape.spec.num_classes, torch.float32)
        phases = {"free": (inputs, free, {}), "nudged (±β, 2B rows)": (nudged_inputs, start,
                                                                       {"beta": betas, "target": target})}
        for name, (inp, state, extra) in phases.items():
            relax(net, inp, state, 3, track=False, **extra)  # compile and warm up
            t = time.perf_counter()
            relax(net, inp, state, 10, track=False, **extra)
            print(f"\n{name}: {(time.perf_counter() - t) * 100:.1f} ms per step ({args.threads} threads)")
            with torch.profiler.profile() as prof:
                relax(net, inp, state, 5, track=False, **extra)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
