"""Where a vanilla timm model's time goes, against what ``dge.patch`` makes of it
(``tools/benchmark.py --timm-model ... --breakdown``).

A DGE block runs some of its block's work on its queries only (the query projection, the
output projection, ``norm2`` and the MLP's matrix products) and the rest densely: the keys and
values, the attention over every window slot, ``norm1`` of the context, rolls, window
partitions, PVT v2's depthwise conv, and everything outside the patched blocks (patch
embeddings, patch merging, query-pooling blocks). ``leaf_times`` times each leaf module of the
vanilla model; ``query_side`` splits that time, and gives ``ideal``: vanilla's own time with
each block's query side shrunk by the share of tokens it keeps, the rest as vanilla runs it.
The routing-free floor can sit below it where DGE's dense work is leaner than vanilla's (PVT
v2's channels-last convolutions, padding tokens of windows that only the vanilla block
projects) and above it where fewer rows make matrix products slower per FLOP.
"""
import statistics
import time
from typing import Callable, Dict

from torch import nn

from ..layers import DynamicGrainedEncoder, RoutingRecord

__all__ = ["QUERY_SIDE", "leaf_times", "query_side"]

# Leaf modules of a timm block that a DGE block runs on its queries only, by their name in the
# block, and the part of their time that is (a fused qkv projection: its query third).
QUERY_SIDE = {"attn.q": 1.0, "attn.qkv": 1.0 / 3.0, "attn.proj": 1.0, "norm2": 1.0, "mlp.fc1": 1.0,
              "mlp.act": 1.0, "mlp.fc2": 1.0}


def leaf_times(model: nn.Module, run: Callable[[], object], runs: int = 3) -> Dict[str, float]:
    """Median ms of every leaf module of ``model`` over ``runs`` calls of ``run()`` (after one
    untimed call), and under "" the time outside them (functional attention, rolls, reshapes)."""
    samples: Dict[str, list] = {}
    starts: Dict[str, float] = {}

    def pre(name):
        return lambda *_: starts.__setitem__(name, time.perf_counter())

    def post(name):
        return lambda *_: samples[name].append((time.perf_counter() - starts[name]) * 1e3)

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    handles = []
    run()
    for name, module in leaves:
        samples[name] = []
        handles += [module.register_forward_pre_hook(pre(name)), module.register_forward_hook(post(name))]
    totals = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            run()
            totals.append((time.perf_counter() - t0) * 1e3)
    finally:
        for handle in handles:
            handle.remove()
    runs_per_leaf = {n: [sum(s[i::runs]) for i in range(runs)] for n, s in samples.items() if s}
    times = {n: statistics.median(v) for n, v in runs_per_leaf.items()}
    times[""] = statistics.median(totals) - sum(times.values())
    return times


def query_side(times: Dict[str, float], patched: nn.Module, record: RoutingRecord) -> Dict[str, float]:
    """Of ``leaf_times`` of the vanilla model: ``total`` ms, the ``query_side`` share (the
    ``QUERY_SIDE`` leaves of the blocks ``patched`` wraps) and ``ideal``, vanilla's time with
    each block's query side scaled by the share of tokens it kept in ``record``, over vanilla's."""
    fractions = {}
    for name, layer in patched.named_modules():
        if isinstance(layer, DynamicGrainedEncoder):
            info = record.of(layer)
            tokens = info.num_tokens + info.num_extra
            fractions[name] = (info.num_queries.float().mean().item() + info.num_extra) / tokens
    total = sum(times.values())
    query, kept = 0.0, 0.0
    for leaf, ms in times.items():
        parts = leaf.split(".")
        block = next((b for b in (".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if b in fractions), None)
        share = QUERY_SIDE.get(leaf[len(block) + 1:], 0.0) if block is not None else 0.0
        query += share * ms
        kept += share * ms * fractions.get(block, 1.0)
    return {"total_ms": round(total, 1), "query_side": round(query / total, 4),
            "ideal": round((total - query + kept) / total, 4)}
