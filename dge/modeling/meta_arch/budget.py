"""The budget-loss hook (Eq. 8) for any detectron2 meta-architecture with a DGE backbone.

``BudgetLossMixin`` goes before a detectron2 meta-architecture in the bases of a class:
in training it adds ``loss_budget = λ(β − γ)²`` to the loss dict and writes β (total and
per stage) and the share of regions at each granularity to the event storage (log,
metrics.json, TensorBoard); in inference it attaches each image's β to its output dict
(``output["dge"]``), which ``DGEStatsEvaluator`` averages over a dataset.
"""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, SemanticSegmentor
from detectron2.utils.events import get_event_storage

from ...layers import BudgetLoss, routing_stats

__all__ = ["BudgetLossMixin", "DGERCNN", "DGESemanticSegmentor"]


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
        self.budget_loss = BudgetLoss(budget, budget_weight)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(budget=cfg.MODEL.DGE.BUDGET, budget_weight=cfg.MODEL.DGE.BUDGET_WEIGHT)
        return ret

    def forward(self, batched_inputs: List[Dict]):
        outputs = super().forward(batched_inputs)
        loss, stats = self.budget_loss(self.backbone)
        if stats is None:
            return outputs
        if self.training:
            outputs["loss_budget"] = loss  # Eq. 8
            storage = get_event_storage()
            storage.put_scalars(**{f"dge/{k}": v.detach().mean().item() for k, v in stats.items()})
            return outputs
        return self.attach_routing_stats(outputs, stats)

    def attach_routing_stats(self, outputs: List[Dict], stats: Optional[Dict[str, torch.Tensor]] = None) -> List[Dict]:
        """Adds each image's β and routing statistics of the last forward to its output dict
        as ``out["dge"]``: 0-dim tensors (no device sync; export and tracing flatten them),
        which float(), format() and comparisons read as numbers."""
        stats = routing_stats(self.backbone) if stats is None else stats
        for i, out in enumerate(outputs):
            out["dge"] = {k: v[i] for k, v in (stats or {}).items()}
        return outputs


@META_ARCH_REGISTRY.register()
class DGERCNN(BudgetLossMixin, GeneralizedRCNN):
    """GeneralizedRCNN (Mask R-CNN) with the DGE budget loss."""


@META_ARCH_REGISTRY.register()
class DGESemanticSegmentor(BudgetLossMixin, SemanticSegmentor):
    """SemanticSegmentor (Semantic FPN) with the DGE budget loss."""
