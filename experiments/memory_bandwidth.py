"""How fast this machine streams the IMDB paper shape's FC-1 matrix (180 M weights, bf16, 360 MB).

The figure behind docs/history.md's byte count: a plain sum over the matrix (streaming bandwidth)
and one bf16 product W·a at batch 32 and 64 (bytes of weights per second and GFLOP/s). `--kernels`
adds the other ways to take the two FC-1 products of a relaxation step (h·W in both layouts, and
int8 × int8 → int32 through `torch._int_mm` and through oneDNN's pre-packed int8 linear, which the
`int8` fast path uses), so a lever can be judged before it is built. Run it at `--threads 1` and
`--threads 2`: a product that halves its time with the second core is bound by compute, not by memory
bandwidth. `--fc1 snli --batches 256,384,512` times the SNLI paper shape's FC-1 (400 × 30,000), where
oneDNN's bf16 x·Wᵀ falls off a cliff at 512 rows (why `lowp_weights.UP_MAX_ROWS` exists).

    python experiments/memory_bandwidth.py [--threads 2] [--repeats 10] [--kernels] [--fc1 imdb|snli] [--batches 32,64]
"""

from __future__ import annotations

import argparse
import time

import torch

from analog_ep.fast.allocator import keep_freed_memory
from analog_ep.fast.lowp_weights import Int8Weight, enable_compiled_quantizers, int8_available, int8_kernel_name

FC1 = {"imdb": (1000, 180_000), "snli": (400, 30_000)}  # (out, in) of the paper shapes' first FC synapse

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
    p.add_argument("--kernels", action="store_true", help="also time layout and int8 variants of both products")
    p.add_argument("--fc1", choices=sorted(FC1), default="imdb", help="which paper shape's FC-1 matrix (default imdb)")
    p.add_argument("--batches", default="32,64", help="comma-separated row counts (default 32,64)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the allocator policy `seqep bench` runs under
    batches = [int(b) for b in args.batches.split(",")]
    w = (torch.randn(*FC1[args.fc1]) / FC1[args.fc1][1] ** 0.5).to(torch.bfloat16)
    gb = w.numel() * w.element_size() / 1e9
    t = seconds(lambda: w.sum(), args.repeats)
    print(f"sum over {gb * 1e3:.0f} MB: {t * 1e3:.1f} ms, {gb / t:.1f} GB/s")
    for batch in batches:
        a = torch.randn(batch, w.shape[1]).to(torch.bfloat16)
        t = seconds(lambda a=a: torch.mm(a, w.t()), args.repeats)
        print(f"W·a at batch {batch}: {t * 1e3:.1f} ms, {gb / t:.1f} GB/s of weights, "
              f"{2 * batch * w.numel() / t / 1e9:.0f} GFLOP/s")
    if args.kernels:
        time_kernels(w, args.repeats, batches)
    return 0


def kernel_cases(w: torch.Tensor, w_t: torch.Tensor, q: torch.Tensor, q_t: torch.Tensor, batch: int,
                 packed: Int8Weight | None) -> dict:
    """The candidate ways to take one step's two FC-1 products at this batch size."""
    a = torch.randn(batch, w.shape[1]).to(torch.bfloat16)
    h = torch.rand(batch, w.shape[0]).to(torch.bfloat16)
    h_t = h.t().contiguous()
    a8 = torch.randint(-127, 128, a.shape, dtype=torch.int8)
    h8_t = torch.randint(-127, 128, h_t.shape, dtype=torch.int8)
    cases = {
        "up   bf16 a·Wᵀ": lambda: torch.mm(a, w.t()),
        "up   int8 a·Wᵀ (_int_mm)": lambda: torch._int_mm(a8, q.t()),
        "up   quantise a to int8 (per row)": lambda: torch.round(
            a.float() * (127 / a.float().abs().amax(1, keepdim=True))).to(torch.int8),
        "down bf16 h·W": lambda: torch.mm(h, w),
        "down bf16 (W_t·hᵀ), result transposed": lambda: torch.mm(w_t, h_t),
        "down bf16 (W_t·hᵀ)ᵀ made contiguous": lambda: torch.mm(w_t, h_t).t().contiguous(),
        "down int8 (W_t·hᵀ) (_int_mm)": lambda: torch._int_mm(q_t, h8_t),
    }
    if packed is not None:  # what precision "int8" runs: quantise the rows, packed int8 product, rescale
        cases[f"up   int8 packed, rows quantised (Int8Weight.up, {packed.kernel})"] = lambda: packed.up(a)
        cases[f"down int8 packed, rows quantised (Int8Weight.down, {packed.kernel})"] = lambda: packed.down(h)
    return cases


def time_kernels(w: torch.Tensor, repeats: int, batches: list[int]) -> None:
    """Each product of one step in several layouts/precisions (ms), so the fastest one can be chosen."""
    w_t = w.t().contiguous()  # (180k, 1000): h·W taken as W_t·hᵀ
    q = torch.randint(-127, 128, w.shape, dtype=torch.int8)
    q_t = q.t().contiguous()
    packed = None
    if int8_available():
        enable_compiled_quantizers(True)  # as the fast path runs them
        w32 = w.float()
        packed = Int8Weight(w32)  # compiles the quantiser
        t = time.perf_counter()
        packed = Int8Weight(w32)
        print(f"int8 quantise + pack (once per batch, {int8_kernel_name()}): {(time.perf_counter() - t) * 1e3:.0f} ms")
    for batch in batches:
        for name, fn in kernel_cases(w, w_t, q, q_t, batch, packed).items():
            print(f"batch {batch}: {name}: {seconds(fn, repeats) * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
