"""A timm model against itself patched by ``dge.patch`` (``tools/benchmark.py --timm-model``):
the same weights but the routers (re-initialised, calibrated to a target β on the
photographs), ``forward_features`` per size and batch, interleaved in one process, repeated
in fresh processes (``run_timm_in_processes``).

Beside DGE, every case runs its **routing-free floor** (``routing_free``): each DGE block runs
its block's ``forward_queries`` on as many leading tokens of every image as the block kept
queries on average, with no router, pooling, gathering or un-pooling: the blocks' own work at
that routing. DGE minus the floor is what routing costs; the floor minus β is what the blocks
lose on fewer rows (smaller matrix products, fixed work).
"""
import contextlib
import copy
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, Tuple

import timm
import torch
from timm.data import resolve_data_config
from torch import nn
from torch.nn import functional as F

from ..adapters import fit_to_windows, patch
from ..layers import DynamicGrainedEncoder, RoutingRecord, complexity_report, dge_modules, record_routing
from ..layers.calibration import calibrate, randomize_routers
from ..layers.grained import token_centers
from .benchmark import _in_fresh_process
from .latency import photos, timed_interleaved
from .time_shares import leaf_times, query_side

__all__ = ["TimmSpec", "create_timm_model", "routing_free", "run_timm_in_processes", "timm_benchmark"]


@dataclass(frozen=True)
class TimmSpec:
    """What ``timm_benchmark`` measures: timm model ``name`` at ``sizes`` (H, W) and ``batches``,
    patched with ``options`` (``DGEOptions`` fields; ``fit_windows``: each block the largest
    region size that tiles its window, ``dge.adapters.fit_to_windows``)."""

    name: str
    sizes: Tuple[Tuple[int, int], ...]
    batches: Tuple[int, ...] = (1,)
    target_beta: float = 0.5
    runs: int = 7
    warmup: int = 2
    options: Dict[str, Any] = field(default_factory=dict)
    fit_windows: bool = False
    breakdown: bool = False  # also time vanilla's leaf modules: its query side share (``time_shares``)


def create_timm_model(name: str, hw: Tuple[int, int]) -> nn.Module:
    """``name`` without a head, for inputs of ``hw`` where the model is built for a size (ViT,
    Swin), any size where it takes any (PVT v2, SAM 2's Hiera)."""
    try:
        return timm.create_model(name, img_size=tuple(hw), num_classes=0).eval()
    except TypeError:  # no img_size argument
        return timm.create_model(name, num_classes=0).eval()


def timm_benchmark(spec: TimmSpec, say=print) -> dict:
    """Vanilla, DGE and the routing-free floor of ``spec``'s model, per size and batch."""
    results = {"timm_model": spec.name, "threads": torch.get_num_threads(), "cases": []}
    options = fit_to_windows(spec.options) if spec.fit_windows else spec.options
    for hw in spec.sizes:
        torch.manual_seed(0)
        vanilla = create_timm_model(spec.name, hw)
        patched = patch(copy.deepcopy(vanilla), options)
        randomize_routers(patched, seed=0)
        for batch in spec.batches:
            row = _timm_case(vanilla, patched, hw, batch, spec)
            say(f"{spec.name} {hw[0]}x{hw[1]} batch {batch}: β {row['beta']}, DGE / vanilla {row['ratio']} "
                f"({row['dge']['median_ms']:.1f} / {row['vanilla']['median_ms']:.1f} ms), routing-free "
                f"{row['routing_free_ratio']}" + _breakdown_text(row.get("breakdown")))
            results["cases"].append(row)
    return results


def _timm_case(vanilla: nn.Module, patched: nn.Module, hw, batch: int, spec: TimmSpec) -> dict:
    data = resolve_data_config(model=vanilla)
    mean, std = (torch.tensor(data[k]).view(1, 3, 1, 1) * 255 for k in ("mean", "std"))
    x = (photos(batch, hw, "cpu") - mean) / std
    with torch.inference_mode():
        calibrate(patched, lambda: patched.forward_features(x), spec.target_beta)
        with record_routing() as record:
            patched.forward_features(x)

        def floor():
            with routing_free(patched, record):
                return patched.forward_features(x)

        cases = {"vanilla": lambda: vanilla.forward_features(x), "dge": lambda: patched.forward_features(x),
                 "routing_free": floor}
        samples = timed_interleaved(cases, spec.runs, spec.warmup)
    row = {k: {"median_ms": round(statistics.median(v), 2)} for k, v in samples.items()}
    row.update(size=list(hw), batch=batch, beta=round(complexity_report(record, patched).beta.mean().item(), 4))
    row["ratio"] = round(row["dge"]["median_ms"] / row["vanilla"]["median_ms"], 4)
    row["routing_free_ratio"] = round(row["routing_free"]["median_ms"] / row["vanilla"]["median_ms"], 4)
    if spec.breakdown:
        with torch.inference_mode():
            times = leaf_times(vanilla, lambda: vanilla.forward_features(x), spec.runs)
        row["breakdown"] = query_side(times, patched, record)
    return row


def _breakdown_text(breakdown) -> str:
    if breakdown is None:
        return ""
    return (f"; vanilla's query side {breakdown['query_side']:.3f} of its time, scaled by the kept queries: "
            f"ideal {breakdown['ideal']}")


class _LeadingMap:
    """The ``QueryMap`` of ``m`` leading rows (E extra tokens, then the map's first tokens)."""

    def __init__(self, m: int, extra: int, tokens: int):
        self.m, self.extra, self.tokens = m, extra, tokens

    def to_map(self, rows: torch.Tensor) -> torch.Tensor:
        return F.pad(rows[:, self.extra:], (0, 0, 0, self.tokens - (self.m - self.extra)))

    def from_map(self, dense: torch.Tensor) -> torch.Tensor:
        return F.pad(dense[:, : self.m - self.extra], (0, 0, self.extra, 0)).reshape(-1, dense.shape[-1])


class _Leading:
    """A DGE block's forward under ``routing_free``: its block's ``forward_queries`` on the
    leading ``m`` rows of the call's tokens, the other tokens passed through."""

    def __init__(self, layer: DynamicGrainedEncoder, m: int):
        self.layer, self.m = layer, m

    def __call__(self, x: torch.Tensor, hw=None, granularity_map=None, **kwargs) -> torch.Tensor:
        call = self.layer.block.prepare(x, hw, **kwargs)
        tokens, m, e = call.tokens, self.m, self.layer.num_extra_tokens
        centers = F.pad(token_centers(*call.hw, device=tokens.device), (0, 0, e, 0))[:m]
        extra = {}
        if getattr(self.layer.block, "uses_query_map", False):
            extra["query_map"] = _LeadingMap(m, e, call.hw[0] * call.hw[1])
        y = call.run(tokens[:, :m], tokens, call.hw, centers.expand(tokens.shape[0], -1, -1), None, **extra)
        return call.restore(torch.cat([y, tokens[:, m:]], dim=1))


@contextlib.contextmanager
def routing_free(patched: nn.Module, record: RoutingRecord) -> Iterator[None]:
    """While active, every DGE block of ``patched`` runs its block on as many leading tokens of
    every image as ``record`` holds queries for it on average (extra tokens included), without
    routing; the model is as it was afterwards."""
    layers = dge_modules(patched)
    for layer in layers:
        info = record.of(layer)
        layer.forward = _Leading(layer, round(info.num_queries.float().mean().item()) + layer.num_extra_tokens)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def run_timm_in_processes(spec: TimmSpec, processes: int, say=print) -> dict:
    """``timm_benchmark`` in ``processes`` fresh processes, one after the other: each ratio's
    median and range over them, the routing-free floor's beside it."""
    runs = [_in_fresh_process(timm_benchmark, spec) for _ in range(processes)]
    summary = {"timm_model": spec.name, "threads": runs[0]["threads"], "processes": processes, "cases": [],
               "per_process": runs}
    for i, case in enumerate(runs[0]["cases"]):
        row = {"size": case["size"], "batch": case["batch"], "beta": [r["cases"][i]["beta"] for r in runs]}
        for key in ("ratio", "routing_free_ratio"):
            values = [r["cases"][i][key] for r in runs]
            row[key] = {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values),
                        "values": values}
        if "breakdown" in case:
            row["breakdown"] = {k: statistics.median(r["cases"][i]["breakdown"][k] for r in runs)
                                for k in case["breakdown"]}
        say(f"{spec.name} {case['size'][0]}x{case['size'][1]} batch {case['batch']} over {processes} processes: "
            f"DGE / vanilla {_spread(row['ratio'])}, routing-free {_spread(row['routing_free_ratio'])}, "
            f"β {min(row['beta']):.3f}-{max(row['beta']):.3f}" + _breakdown_text(row.get("breakdown")))
        summary["cases"].append(row)
    return summary


def _spread(stats: Dict[str, Any]) -> str:
    return f"{stats['median']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"

