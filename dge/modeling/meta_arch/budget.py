"""The budget-loss hook (Eq. 8) for any detectron2 meta-architecture with a DGE backbone.

``BudgetLossMixin`` goes before a detectron2 meta-architecture in the bases of a class:
in training it adds ``loss_budget = λ(β − γ)²`` to the loss dict and writes β (total and
per stage) and the share of regions at each granularity to the event storage (log,
metrics.json, TensorBoard), read from the device in one transfer: after backward when the
trainer has a ``dge.engine.RoutingStatsWriter`` hook (``train_net.py`` does; no host sync
in the forward), else in the forward; in inference it attaches each image's β to its output dict
(``output["dge"]``), which ``DGEStatsEvaluator`` averages over a dataset. With
MODEL.DGE.INFERENCE_BUDGET β, inference runs the routers with the offsets calibrated for β
(``tools/calibrate_budget.py``), put in use when the weights are loaded.
"""
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, SemanticSegmentor
from detectron2.utils.events import get_event_storage

from ...layers import BudgetLoss, check_budget, routing_stats, use_budget

__all__ = ["BudgetLossMixin", "DGERCNN", "DGESemanticSegmentor"]


class BudgetLossMixin:
    """Adds the budget loss and routing statistics to a detectron2 meta-architecture.

    Args:
        budget: γ ∈ [0, 1].
        budget_weight: λ ≥ 0.
        inference_budget: 0 (the routers as trained) or a β target whose calibrated offsets
            the loaded weights hold.
    """

    @configurable
    def __init__(self, *, budget: float, budget_weight: float, inference_budget: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= budget <= 1.0:
            raise ValueError(f"MODEL.DGE.BUDGET must be in [0, 1]; got {budget}")
        if budget_weight < 0:
            raise ValueError(f"MODEL.DGE.BUDGET_WEIGHT must be >= 0; got {budget_weight}")
        self.budget_loss = BudgetLoss(budget, budget_weight)
        self.inference_budget = 0.0
        if inference_budget:
            self.inference_budget = check_budget(inference_budget, "MODEL.DGE.INFERENCE_BUDGET")
            self._budget_loaded = False
            self.register_load_state_dict_post_hook(BudgetLossMixin._use_inference_budget)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(
            budget=cfg.MODEL.DGE.BUDGET,
            budget_weight=cfg.MODEL.DGE.BUDGET_WEIGHT,
            inference_budget=cfg.MODEL.DGE.INFERENCE_BUDGET,
        )
        return ret

    @staticmethod
    def _use_inference_budget(module, incompatible_keys) -> None:
        use_budget(module.backbone, module.inference_budget)  # a ValueError when the weights lack it
        module._budget_loaded = True

    # True while a dge.engine.RoutingStatsWriter hook writes the training statistics after
    # backward; False: the forward writes them.
    defer_routing_stats = False

    def forward(self, batched_inputs: List[Dict]):
        if self.inference_budget and not self.training and not self._budget_loaded:
            raise ValueError(
                f"MODEL.DGE.INFERENCE_BUDGET {self.inference_budget:g} takes its router offsets from MODEL.WEIGHTS, "
                "and no weights were loaded: give a checkpoint written by tools/calibrate_budget.py"
            )
        outputs = super().forward(batched_inputs)
        loss, stats = self.budget_loss(self.backbone)
        if stats is None:
            return outputs
        if self.training:
            outputs["loss_budget"] = loss  # Eq. 8
            self._routing_scalars = list(stats), torch.stack([v.detach().float().mean() for v in stats.values()])
            if not self.defer_routing_stats:
                self.write_routing_stats()
            return outputs
        return self.attach_routing_stats(outputs, stats)

    def write_routing_stats(self) -> None:
        """Puts the last training forward's routing statistics (batch means) in the event
        storage as ``dge/<name>``, read from the device in one transfer; then forgets them."""
        pending, self._routing_scalars = getattr(self, "_routing_scalars", None), None
        if pending is not None:
            names, values = pending
            get_event_storage().put_scalars(**{f"dge/{k}": v for k, v in zip(names, values.tolist())})

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
