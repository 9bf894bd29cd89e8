"""Our AVX2 kernels beside torch's products of the same operands, in one run: the figures behind
docs/benchmarks.md's AVX2 section and the thresholds in `precision.AVX2_INT8_MIN_WEIGHTS` and
`retrieval.FUSED_MAX_QUERIES`.

- `int8`: the first synapse's two products (x·Wᵀ "up", h·W "down") with `avx2_int8.PackedInt8Avx2` against
  torch's fp32 products, at the IMDB paper shape's FC-1 (1,000 × 180,000) for 32 and 64 rows (GMAC/s).
- `retrieval`: one retrieval over a group of distinct keys with the fused fp32 kernel (`_retrieve_fp32`)
  against torch's batched products and compiled softmax, at the shapes that decided FUSED_MAX_QUERIES
  (queries, width d, distinct keys U).

    python experiments/avx2_kernels.py [--what int8,retrieval] [--threads 2] [--repeats 20]

Best of `--repeats` calls after one warm-up; run it on a quiet machine (other work skews both sides alike only
if it is steady).
"""

from __future__ import annotations

import argparse
import time

import torch

from analog_ep.fast import avx2_int8, retrieval
from analog_ep.fast.retrieval import DistinctKeys, Query

FC1 = (1000, 180_000)
# (queries, d, distinct keys U, length L): the imdb `cpu` preset's pooled queries, sentences, more queries
RETRIEVAL_SHAPES = [(8, 50, 700, 1199), (25, 300, 12, 25), (25, 102, 12, 25), (8, 300, 200, 600),
                    (64, 50, 700, 1199), (128, 300, 222, 600), (600, 300, 222, 600)]


def best(repeats: int, fn, *args) -> float:
    """Best seconds of `repeats` calls fn(*args), after one warm-up."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t)
    return min(times)


def int8_products(repeats: int) -> None:
    out_f, in_f = FC1
    w = torch.randn(out_f, in_f) * 0.01
    t = time.perf_counter()
    packed = avx2_int8.PackedInt8Avx2(w)
    print(f"int8 pack (first, with page faults): {time.perf_counter() - t:.3f} s")
    t = time.perf_counter()
    packed = avx2_int8.PackedInt8Avx2(w, packed)
    print(f"int8 pack (buffers reused, as every batch): {time.perf_counter() - t:.3f} s")
    for rows in (32, 64):
        x, h = torch.rand(rows, in_f), torch.rand(rows, out_f)
        macs = rows * in_f * out_f / 1e9
        f_up, f_down = best(repeats, torch.mm, x, w.t()), best(repeats, torch.mm, h, w)
        i_up, i_down = best(repeats, packed.up, x), best(repeats, packed.down_row_scaled, h, torch.float32)
        ratio = (f_up + f_down) / (i_up + i_down)
        print(f"{rows} rows: fp32 up {macs / f_up:.0f} down {macs / f_down:.0f} GMAC/s | int8 AVX2 up "
              f"{macs / i_up:.0f} down {macs / i_down:.0f} GMAC/s | both products {ratio:.2f}×")


def retrievals(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for queries, dim, distinct, length in RETRIEVAL_SHAPES:
        batch = 32 if length > 100 else 64
        keys = torch.randn(batch, 1, length, dim, generator=gen)
        keys[:, :, distinct:] = keys[:, :, :1]  # `distinct` different keys per row
        dk = DistinctKeys.build(keys, None, None, 0.14, torch.float32, query_len=queries)
        query = Query(torch.randn(batch, 1, queries, dim, generator=gen))
        retrieval.enable_compiled(False)
        retrieval.enable_compiled(True)  # torch's products with the compiled softmax, and the fused kernel's switch
        if not retrieval.enable_fused_fp32():
            print("the AVX2 kernel set does not load here: nothing to compare")
            return
        flat = query.values.reshape(batch, queries, dim)
        fused = best(repeats, retrieval._retrieve_fp32, dk.groups[0], flat, None, None)
        retrieval.enable_fused_fp32(False)
        plain = best(repeats, dk.retrieve, query)
        print(f"{queries} queries, d = {dim}, U = {dk.groups[0].width}, batch {batch}: torch {plain * 1e3:.2f} ms, "
              f"fused {fused * 1e3:.2f} ms ({plain / fused:.2f}×)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="int8,retrieval", help="comma-separated: int8, retrieval")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not avx2_int8.available():
        raise SystemExit(f"the AVX2 kernels do not load here: {avx2_int8.unavailable_reason()}")
    for what in args.what.split(","):
        {"int8": int8_products, "retrieval": retrievals}[what.strip()](args.repeats)


if __name__ == "__main__":
    main()
