"""Routers of untrained models made to route by content, at a chosen β: random gate weights,
then one offset (or one per router) on the finest choice's logit, found by bisection."""
import math
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from ..layers import complexity_report, dge_modules

__all__ = ["randomize_routers", "set_logit_offset", "calibrate"]


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
    """Adds ``offsets`` (one for all routers, or one per router) to the routers'
    finest-choice biases (from their current values)."""
    modules = dge_modules(model)
    offsets = list(offsets) * len(modules) if len(offsets) == 1 else list(offsets)
    for m, offset in zip(modules, offsets):
        fine = m.granularities.index(min(g for g in m.granularities if g > 0))
        m.router.gate.bias[fine] += offset


@torch.no_grad()
def calibrate(
    model: nn.Module, run: Callable[[], object], target: float, steps: int = 14, per_block: bool = False
) -> Tuple[List[float], float]:
    """Bisection on offsets added to the routers' finest-choice logits: one shared offset on
    the model's β, or (``per_block``) one per router on its own block's β. ``run()`` runs the
    model on the calibration inputs. Returns (offsets, measured β of the last run), leaving
    the offsets applied."""
    n = len(dge_modules(model)) if per_block else 1
    lo, hi, applied = [-30.0] * n, [30.0] * n, [0.0] * n
    beta = None
    for _ in range(steps):
        mid = [0.5 * (a + b) for a, b in zip(lo, hi)]
        set_logit_offset(model, [m - a for m, a in zip(mid, applied)])
        applied = mid
        run()
        report = complexity_report(model)
        beta = report.beta.mean().item()
        betas = report.layer_beta.mean(dim=1).tolist() if per_block else [beta]
        for i, value in enumerate(betas):
            if value > target:
                hi[i] = applied[i]
            else:
                lo[i] = applied[i]
    return applied, beta
