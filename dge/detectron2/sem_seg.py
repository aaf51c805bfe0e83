"""The Semantic FPN head the paper trained (Sec. 4.2.2, in mmsegmentation): detectron2's
``SemSegFPNHead`` with the two things mmsegmentation's ``FPNHead`` does differently."""
from typing import Dict

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from torch import nn

__all__ = ["SemanticFPNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class SemanticFPNHead(SemSegFPNHead):
    """``SemSegFPNHead`` (same layers and parameters) as mmsegmentation's ``FPNHead``: channel
    dropout before the 1×1 classifier, and the classifier initialised from N(0, 0.01²) with zero
    bias (detectron2 uses MSRA fill, whose logits start an order of magnitude larger).

    Args:
        dropout: probability of ``nn.Dropout2d`` on the summed features, in [0, 1).
        Others as ``SemSegFPNHead``.
    """

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, dropout: float = 0.0, **kwargs):
        super().__init__(input_shape, **kwargs)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.DROPOUT must be in [0, 1); got {dropout}")
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["dropout"] = cfg.MODEL.SEM_SEG_HEAD.DROPOUT
        return ret

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: {"p2": [B, C, H/4, W/4], ...} -> logits [B, K, H/4, W/4]."""
        x = sum(head(features[f]) for f, head in zip(self.in_features, self.scale_heads))
        return self.predictor(self.dropout(x))
