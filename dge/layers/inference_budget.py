"""Inference budgets: one trained DGE model run at another complexity ratio β without
retraining. Each router keeps a small table of calibrated β targets and the offset of its
finest choice's logit for each (``GrainedRouter.budget_targets`` / ``budget_offsets``, saved
with the model); ``use_budget`` puts one target's offsets in use (eval mode only), and
``store_budget`` writes the offsets in use into the table (``tools/calibrate_budget.py``
finds them with ``dge.layers.calibration.calibrate``)."""
import math
from typing import List, Sequence

import torch
from torch import nn

from .complexity import dge_modules
from .router import MAX_BUDGETS, GrainedRouter

__all__ = ["budget_routers", "set_budget_offsets", "store_budget", "stored_budgets", "use_budget", "check_budget"]


def check_budget(target: float, what: str = "an inference budget") -> float:
    """``target`` as a float in (0, 1], else a ValueError naming ``what``."""
    target = float(target)
    if not (0.0 < target <= 1.0) or math.isnan(target):
        raise ValueError(f"{what} is a complexity ratio β in (0, 1]; got {target}")
    return target


def budget_routers(model: nn.Module) -> List[GrainedRouter]:
    """The routers of ``model``'s DGE blocks, in forward order; a ValueError when it has none."""
    routers = [m.router for m in dge_modules(model) if m.router is not None]
    if not routers:
        raise ValueError(
            f"{type(model).__name__} has no DGE routers (MODEL.DGE.ENABLED False, or every Φ has one "
            "granularity): an inference budget needs a DGE model"
        )
    return routers


@torch.no_grad()
def set_budget_offsets(model: nn.Module, offsets: Sequence[float]) -> None:
    """Puts ``offsets`` in use (one for all routers, or one per router), in eval mode only."""
    routers = budget_routers(model)
    offsets = list(offsets) * len(routers) if len(offsets) == 1 else list(offsets)
    if len(offsets) != len(routers):
        raise ValueError(f"{len(offsets)} offsets for {len(routers)} routers")
    for router, offset in zip(routers, offsets):
        router.budget_offset.fill_(offset)


def _slot(router: GrainedRouter, target: float) -> int:
    targets = router.budget_targets.float().tolist()
    for i, t in enumerate(targets):
        if t > 0 and abs(t - target) < 1e-6:
            return i
    return -1


def stored_budgets(model: nn.Module) -> List[float]:
    """The β targets every router of ``model`` has offsets for, ascending."""
    routers = budget_routers(model)
    common = None
    for router in routers:
        mine = {round(t, 6) for t in router.budget_targets.float().tolist() if t > 0}
        common = mine if common is None else common & mine
    return sorted(common)


@torch.no_grad()
def store_budget(model: nn.Module, target: float) -> None:
    """Writes the offsets in use into every router's table as those of ``target`` (replacing
    an earlier entry for it)."""
    target = check_budget(target)
    for router in budget_routers(model):
        slot = _slot(router, target)
        if slot < 0:
            free = [i for i, t in enumerate(router.budget_targets.float().tolist()) if t <= 0]
            if not free:
                raise ValueError(
                    f"the routers already keep {MAX_BUDGETS} inference budgets {stored_budgets(model)}; "
                    "calibrate from a checkpoint with fewer"
                )
            slot = free[0]
        router.budget_targets[slot] = target
        router.budget_offsets[slot] = router.budget_offset


@torch.no_grad()
def use_budget(model: nn.Module, target: float) -> None:
    """Puts the stored offsets of ``target`` in use (a ValueError naming the stored ones when
    a router has none for it). A host-side lookup: call it when the model is loaded, not in
    its forward."""
    target = check_budget(target, "MODEL.DGE.INFERENCE_BUDGET")
    for router in budget_routers(model):
        slot = _slot(router, target)
        if slot < 0:
            stored = stored_budgets(model)
            raise ValueError(
                f"no calibrated offsets for β = {target:g} in the model's routers (stored: "
                f"{stored or 'none'}); make them with tools/calibrate_budget.py --target-beta {target:g}"
            )
        router.budget_offset.copy_(router.budget_offsets[slot])
