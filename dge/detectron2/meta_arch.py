"""The budget-loss hook (Eq. 8) for any detectron2 meta-architecture with a DGE backbone.

``BudgetLossMixin`` goes before a detectron2 meta-architecture in the bases of a class:
in training it adds ``loss_budget = λ(β − γ)²`` to the loss dict and writes β (total and
per stage) and the share of regions at each granularity to the event storage (log,
metrics.json, TensorBoard), read from the device in one transfer: after backward when the
trainer has a ``dge.detectron2.engine.RoutingStatsWriter`` hook (``train_net.py`` does; no host sync
in the forward), else in the forward; in inference it attaches each image's β to its output dict
(``output["dge"]``), which ``DGEStatsEvaluator`` averages over a dataset. With
MODEL.DGE.INFERENCE_BUDGET β, inference runs the routers with the offsets calibrated for β
(``tools/calibrate_budget.py``), put in use when the weights are loaded.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, SemanticSegmentor
from detectron2.utils.events import get_event_storage

from dge.models.parts import padded_size
from dge.layers import BudgetLoss, beta_range, check_budget, dge_modules, record_routing, use_budget

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
        if not math.isfinite(budget_weight) or budget_weight < 0:  # (NaN < 0 is False)
            raise ValueError(f"MODEL.DGE.BUDGET_WEIGHT must be a finite number >= 0; got {budget_weight}")
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

    # True while a dge.detectron2.engine.RoutingStatsWriter hook writes the training statistics after
    # backward; False: the forward writes them.
    defer_routing_stats = False

    def forward(self, batched_inputs: List[Dict]):
        if self.inference_budget and not self.training and not self._budget_loaded:
            raise ValueError(
                f"MODEL.DGE.INFERENCE_BUDGET {self.inference_budget:g} takes its router offsets from MODEL.WEIGHTS, "
                "and no weights were loaded: give a checkpoint written by tools/calibrate_budget.py"
            )
        with record_routing() as record:  # this call's routing: a model shared by threads keeps them apart
            outputs = super().forward(batched_inputs)
        loss, stats = self.budget_loss(self.backbone, record)
        if stats is None:
            return outputs
        if self.training:
            outputs["loss_budget"] = loss  # Eq. 8
            self._routing_scalars = list(stats), torch.stack([v.detach().float().mean() for v in stats.values()])
            if not self.defer_routing_stats:
                self.write_routing_stats()
            return outputs
        return self.attach_routing_stats(outputs, stats)

    @torch.no_grad()
    def budget_warnings(self, image_hw: Tuple[int, int]) -> List[str]:
        """What the budget loss cannot do on images of ``image_hw`` (H, W): move β at all (Φ
        of one choice: no router), or reach γ (outside the β of the coarsest and the finest
        routing, ``beta_range``); [] when it can. Runs the backbone twice in eval mode."""
        blocks = dge_modules(self.backbone)
        gamma = self.budget_loss.budget
        if not blocks or self.budget_loss.weight == 0:
            return []
        h, w = padded_size(image_hw, self.backbone.size_divisibility)
        x = torch.zeros(1, 3, h, w, device=self.device)
        was_training = self.training
        self.eval()
        try:
            low, high = beta_range(self.backbone, lambda: self.backbone(x))
        finally:
            self.train(was_training)
        phi = sorted({g for m in blocks for g in m.granularities})
        where = f"on {h}×{w} inputs: the budget loss cannot reach it"
        if all(m.router is None for m in blocks):
            return [
                f"MODEL.DGE.GRANULARITIES {phi} is one choice: the DGE blocks have no router, β stays {low:.3f} "
                f"and the budget loss (MODEL.DGE.BUDGET {gamma:g}) cannot move it"
            ]
        if gamma < low - 1e-3:
            return [f"MODEL.DGE.BUDGET {gamma:g} is below β {low:.3f} of every region at the coarsest φ of {phi} {where}"]
        if gamma > high + 1e-3:
            return [f"MODEL.DGE.BUDGET {gamma:g} is above β {high:.3f} of every region at the finest φ of {phi} {where}"]
        return []

    def write_routing_stats(self) -> None:
        """Puts the last training forward's routing statistics (batch means) in the event
        storage as ``dge/<name>``, read from the device in one transfer; then forgets them."""
        pending, self._routing_scalars = getattr(self, "_routing_scalars", None), None
        if pending is not None:
            names, values = pending
            get_event_storage().put_scalars(**{f"dge/{k}": v for k, v in zip(names, values.tolist())})

    def attach_routing_stats(self, outputs: List[Dict], stats: Optional[Dict[str, torch.Tensor]]) -> List[Dict]:
        """Adds each image's β and routing statistics (``routing_stats``) to its output dict
        as ``out["dge"]``: 0-dim tensors (no device sync; export and tracing flatten them),
        which float(), format() and comparisons read as numbers."""
        for i, out in enumerate(outputs):
            out["dge"] = {k: v[i] for k, v in (stats or {}).items()}
        return outputs


@META_ARCH_REGISTRY.register()
class DGERCNN(BudgetLossMixin, GeneralizedRCNN):
    """GeneralizedRCNN (Mask R-CNN) with the DGE budget loss."""


@META_ARCH_REGISTRY.register()
class DGESemanticSegmentor(BudgetLossMixin, SemanticSegmentor):
    """SemanticSegmentor (Semantic FPN) with the DGE budget loss."""
