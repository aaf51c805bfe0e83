"""Router calibration, the one implementation: offsets on the finest choice's logit found by
bisection until β reaches a target (shared, per block or per stage). Untrained models
(benchmarks, export checks) get random gate weights first and the offsets on their biases;
trained ones get them as inference budgets (``tools/calibrate_budget.py``,
``dge.layers.inference_budget``)."""
import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .complexity import complexity_report, dge_modules, dge_stages
from .routing import RoutingRecord, record_routing

__all__ = ["randomize_routers", "set_logit_offset", "calibrate", "block_flops", "stage_groups"]


@torch.no_grad()
def randomize_routers(model: nn.Module, seed: int = 0) -> None:
    """Gate weights of every router drawn with std 1/√C (seeded): regions then differ in
    their scores, which an untrained router (weights ≈ 0) does not give."""
    gen = torch.Generator().manual_seed(seed)
    for m in dge_modules(model):
        weight = m.router.gate.weight
        weight.copy_(torch.randn(weight.shape, generator=gen).to(weight) / math.sqrt(m.router.gate.in_features))


@torch.no_grad()
def set_logit_offset(model: nn.Module, offsets: Sequence[float]) -> None:
    """Sets ``offsets`` (one for all routers, or one per router) on the routers' finest-choice
    biases, measured from the biases before the first call: a second call replaces the first."""
    modules = dge_modules(model)
    offsets = list(offsets) * len(modules) if len(offsets) == 1 else list(offsets)
    for m, offset in zip(modules, offsets):
        router = m.router
        router.gate.bias[router.fine_index] += offset - getattr(router, "_bias_offset", 0.0)
        router._bias_offset = float(offset)


def block_flops(model: nn.Module, record: RoutingRecord) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dynamic, static) multiply-adds per DGE block of ``model`` [L], summed over the images
    of the forward in ``record``."""
    report = complexity_report(record, model)
    return report.dynamic_flops.sum(dim=1), report.static_flops * report.dynamic_flops.shape[1]


def stage_groups(model: nn.Module) -> List[List[int]]:
    """The DGE blocks' indices (forward order) grouped by stage."""
    return [[i for i, _, _ in layers] for layers in dge_stages(model).values()]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    run: Callable[[], object],
    target: float,
    steps: int = 14,
    per_block: bool = False,
    groups: Optional[List[List[int]]] = None,
    apply: Optional[Callable[[nn.Module, Sequence[float]], None]] = None,
    bound: float = 30.0,
) -> Tuple[List[float], float]:
    """Bisection on offsets added to the routers' finest-choice logits, in [-bound, bound]:
    one shared offset on the model's β, one per router (``per_block``) on its own block's β,
    or one per group of blocks (``groups``, e.g. ``stage_groups``) on the group's β.

    ``run()`` runs the model on the calibration inputs; it returns None (β is read from its
    forward) or ``block_flops``-like (dynamic [L], static [L]) sums over several forwards.
    ``apply(model, offsets)`` puts absolute per-router offsets in place: by default on the
    finest-choice biases (untrained models, ``tools/benchmark.py``), or the routers' inference
    budget (``dge.layers.set_budget_offsets``). Returns (offsets per group, β of the last run),
    leaving the offsets applied."""
    n_blocks = len(dge_modules(model))
    if groups is None:
        groups = [[i] for i in range(n_blocks)] if per_block else [list(range(n_blocks))]
    apply = apply or set_logit_offset
    lo, hi = [-bound] * len(groups), [bound] * len(groups)
    offsets, beta = [0.0] * len(groups), None
    for _ in range(steps):
        offsets = [0.5 * (a + b) for a, b in zip(lo, hi)]
        per_block_offsets = [0.0] * n_blocks
        for group, offset in zip(groups, offsets):
            for i in group:
                per_block_offsets[i] = offset
        apply(model, per_block_offsets)
        with record_routing() as record:
            out = run()
        dynamic, static = out if isinstance(out, tuple) else block_flops(model, record)
        beta = (dynamic.sum() / static.sum()).item()
        for k, group in enumerate(groups):
            if (dynamic[group].sum() / static[group].sum()).item() > target:
                hi[k] = offsets[k]
            else:
                lo[k] = offsets[k]
    return offsets, beta
