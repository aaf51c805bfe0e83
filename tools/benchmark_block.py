#!/usr/bin/env python
"""Latency of one DGE block against its vanilla block, same weights, same input.

Default: a PVT-S stage-1 block (C=64, 1 head, SR ratio 8, MLP ratio 8) on a 200×320
token map (an 800×1280 image), batch 1, at all-granularity-1 and at a query ratio of 0.5
(a fixed random map of φ ∈ {1, 2, 4}). Runs are interleaved (vanilla, DGE, vanilla, ...)
so that machine noise hits both alike; the median of ``--runs`` is reported.

    .venv/bin/python tools/benchmark_block.py [--attention sr|deformable] [--runs 15] [--json out.json]
"""
import argparse
import json
import statistics

import torch

from dge.analysis.latency import timed_interleaved
from dge.layers import DeformableAttention, DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
from dge.layers import record_routing


def map_with_query_ratio(batch, region_grid, ratio, region_size, generator):
    """A random φ ∈ {1, 2, 4} map whose query count is ``ratio`` of the tokens (±1 region)."""
    hr, wr = region_grid
    n = hr * wr
    per_region = {1: region_size**2, 2: (region_size // 2) ** 2, 4: 1}
    # Split regions between φ=1 and the cheapest mix of φ=2 / φ=4 that meets the ratio.
    target = ratio * n * per_region[1]
    gmap = torch.full((batch, n), 4, dtype=torch.long)
    queries = n * per_region[4]
    perm = torch.randperm(n, generator=generator)
    for g in (1, 2):  # promote regions until the target is reached
        gain = per_region[g] - per_region[4]
        k = int(max(0.0, min(n, (target - queries) // gain)))
        free = perm[(gmap[0, perm] == 4)][:k]
        gmap[:, free] = g
        queries += k * gain
    return gmap.view(batch, hr, wr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", default="sr", choices=["sr", "deformable"])
    parser.add_argument("--tokens", type=int, nargs=2, default=[200, 320], metavar=("H", "W"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--ratio", type=float, default=0.5, help="query ratio of the sparse case")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    c = args.dim
    if args.attention == "sr":
        attn = SpatialReductionAttention(c, num_heads=1, qkv_bias=True, sr_ratio=8, norm_eps=1e-6)
    else:
        attn = DeformableAttention(c, num_heads=1, num_points=4, qkv_bias=True)
    block = EncoderBlock(c, attn, mlp_ratio=8, norm_eps=1e-6).eval()
    dge = DynamicGrainedEncoder(block, c, dict(granularities=(1, 2, 4))).eval()
    h, w = args.tokens
    x = torch.randn(args.batch, h * w, c)
    hr, wr = -(-h // 4), -(-w // 4)
    ones = torch.ones(args.batch, hr, wr, dtype=torch.long)
    sparse = map_with_query_ratio(args.batch, (hr, wr), args.ratio, 4, torch.Generator().manual_seed(0))

    cases = {
        "vanilla": lambda: block(x, (h, w)),
        "dge_all_fine": lambda: dge(x, (h, w), ones),
        "dge_sparse": lambda: dge(x, (h, w), sparse),
    }
    with torch.inference_mode():
        with record_routing() as record:
            dge(x, (h, w), sparse)
        query_ratio = record.of(dge).num_queries.float().mean().item() / (h * w)
        samples = timed_interleaved(cases, args.runs, args.warmup)  # ms
    med = {k: statistics.median(v) for k, v in samples.items()}
    spread = {k: (min(v), max(v)) for k, v in samples.items()}
    result = {
        "attention": args.attention,
        "tokens": [h, w],
        "dim": c,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "query_ratio_sparse": round(query_ratio, 4),
        "median_ms": {k: round(v, 2) for k, v in med.items()},
        "min_max_ms": {k: [round(a, 2), round(b, 2)] for k, (a, b) in spread.items()},
        "ratio_all_fine": round(med["dge_all_fine"] / med["vanilla"], 4),
        "ratio_sparse": round(med["dge_sparse"] / med["vanilla"], 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
