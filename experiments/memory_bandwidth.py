"""How fast this machine streams the IMDB paper shape's FC-1 matrix (180 M weights, bf16, 360 MB).

The figure behind docs/benchmarks.md's byte count: a plain sum over the matrix (streaming bandwidth)
and one bf16 product W·a at batch 32 and 64 (bytes of weights per second and GFLOP/s).

    python experiments/memory_bandwidth.py [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch


def seconds(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = torch.randn(1000, 180_000).to(torch.bfloat16)
    gb = w.numel() * w.element_size() / 1e9
    t = seconds(lambda: w.sum(), args.repeats)
    print(f"sum over {gb * 1e3:.0f} MB: {t * 1e3:.1f} ms, {gb / t:.1f} GB/s")
    for batch in (32, 64):
        a = torch.randn(batch, w.shape[1]).to(torch.bfloat16)
        t = seconds(lambda a=a: torch.mm(a, w.t()), args.repeats)
        print(f"W·a at batch {batch}: {t * 1e3:.1f} ms, {gb / t:.1f} GB/s of weights, "
              f"{2 * batch * w.numel() / t / 1e9:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
