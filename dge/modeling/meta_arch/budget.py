"""The budget-loss hook (Eq. 8) for any detectron2 meta-architecture with a DGE backbone.

``BudgetLossMixin`` goes before a detectron2 meta-architecture in the bases of a class:
in training it adds ``loss_budget = λ(β − γ)²`` to the loss dict and writes β (total and
per stage) and the share of regions at each granularity to the event storage (log,
metrics.json, TensorBoard); in inference it attaches each image's β to its output dict
(``output["dge"]``), which ``DGEStatsEvaluator`` averages over a dataset.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, SemanticSegmentor
from detectron2.utils.events import get_event_storage

from ...layers import budget_loss, complexity_report, dge_stages

__all__ = ["BudgetLossMixin", "DGERCNN", "DGESemanticSegmentor", "routing_stats"]


def routing_stats(model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Per-image statistics of the last forward of the DGE blocks in ``model``:
    ``beta`` [B], ``beta_stage{k}`` [B] (k = 1.. in forward order) and ``share_phi{g}`` [B],
    the share of regions at granularity g. None when the model has no DGE block."""
    stages = dge_stages(model)
    if not stages:
        return None
    report = complexity_report(model)
    stats = OrderedDict(beta=report.beta)
    for k, layers in enumerate(stages.values(), start=1):
        rows = [i for i, _, _ in layers]
        stats[f"beta_stage{k}"] = report.dynamic_flops[rows].sum(0) / report.static_flops[rows].sum()
    named = [m for layers in stages.values() for _, _, m in layers]
    maps = [m.last_routing.granularity_map.flatten(1) for m in named]
    all_maps = torch.cat(maps, dim=1)
    for g in sorted({g for m in named for g in m.granularities}):
        stats[f"share_phi{g}"] = (all_maps == g).float().mean(dim=1)
    return stats


class BudgetLossMixin:
    """Adds the budget loss and routing statistics to a detectron2 meta-architecture.

    Args:
        budget: γ ∈ [0, 1].
        budget_weight: λ ≥ 0.
    """

    @configurable
    def __init__(self, *, budget: float, budget_weight: float, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"MODEL.DGE.BUDGET must be in [0, 1]; got {budget}")
        if budget_weight < 0:
            raise ValueError(f"MODEL.DGE.BUDGET_WEIGHT must be >= 0; got {budget_weight}")
        self.budget = budget
        self.budget_weight = budget_weight

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(budget=cfg.MODEL.DGE.BUDGET, budget_weight=cfg.MODEL.DGE.BUDGET_WEIGHT)
        return ret

    def forward(self, batched_inputs: List[Dict]):
        outputs = super().forward(batched_inputs)
        stats = routing_stats(self.backbone)
        if stats is None:
            return outputs
        if self.training:
            outputs["loss_budget"] = budget_loss(stats["beta"], self.budget, self.budget_weight)  # Eq. 8
            storage = get_event_storage()
            storage.put_scalars(**{f"dge/{k}": v.detach().mean().item() for k, v in stats.items()})
            return outputs
        for i, out in enumerate(outputs):
            out["dge"] = {k: v[i].item() for k, v in stats.items()}
        return outputs


@META_ARCH_REGISTRY.register()
class DGERCNN(BudgetLossMixin, GeneralizedRCNN):
    """GeneralizedRCNN (Mask R-CNN) with the DGE budget loss."""


@META_ARCH_REGISTRY.register()
class DGESemanticSegmentor(BudgetLossMixin, SemanticSegmentor):
    """SemanticSegmentor (Semantic FPN) with the DGE budget loss."""
