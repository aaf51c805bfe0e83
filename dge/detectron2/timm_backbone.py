"""Any timm model as a detectron2 backbone (MODEL.BACKBONE.NAME "build_timm_fpn_backbone"):
the maps timm's ``forward_intermediates`` returns at MODEL.TIMM.OUT_INDICES, named by stride
(res2 = stride 4 ... res5 = stride 32), into an FPN; a model with one output map (a plain
ViT) gets ViTDet's simple feature pyramid instead. With MODEL.DGE.ENABLED the model is
patched by ``dge.patch`` (Swin, PVT v2, Hiera, SAM 2's Hiera, ViT, EVA, SAM), so the budget
loss, per-image FLOPs, gate maps and export work as for PVT. ImageNet weights come through
``tools/convert_pretrained.py --config-file`` (the model module's own checkpoint filter) and
MODEL.WEIGHTS.
"""
import math
from typing import Dict, Sequence

import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.models._features import feature_take_indices
from torch import nn

from dge.adapters import fit_to_windows, patch
from dge.layers import DGEOptions
from dge.models.parts import check_input_size

from .backbone import fpn_from_config
from .vitdet import SimpleFeaturePyramid

__all__ = ["TimmBackbone", "build_timm_backbone", "build_timm_fpn_backbone", "timm_model_from_config"]


def _stride_name(stride: int) -> str:
    level = math.log2(stride)
    if level != int(level):
        raise ValueError(f"timm backbone outputs are named by stride (res2 = 4 ... res5 = 32); got stride {stride}")
    return f"res{int(level)}"


class TimmBackbone(Backbone):
    """A timm model's ``forward_intermediates`` maps as detectron2 features.

    Args:
        model: a timm model with ``forward_intermediates`` and ``feature_info`` (patched or not);
            what lies past the last requested map (later stages, final norm, head) is pruned.
        out_indices: indices into ``model.feature_info`` (negative from the end): stages of a
            hierarchical model, blocks of a plain ViT. Each output is named by its stride.
    """

    def __init__(self, model: nn.Module, out_indices: Sequence[int]):
        super().__init__()
        if not hasattr(model, "forward_intermediates") or not getattr(model, "feature_info", None):
            raise ValueError(f"{type(model).__name__} has no forward_intermediates / feature_info: a timm backbone "
                             "needs a timm model from timm 1.0 or later")
        info = model.feature_info
        self._indices, _ = feature_take_indices(len(info), list(out_indices))
        names = [_stride_name(info[i]["reduction"]) for i in self._indices]
        if len(set(names)) < len(names):
            raise ValueError(f"MODEL.TIMM.OUT_INDICES {list(out_indices)} take several maps of one stride "
                             f"({names}); a detectron2 backbone names its outputs by stride")
        if hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
        self.model = model
        self._out_features = names
        self._out_feature_strides = {n: info[i]["reduction"] for n, i in zip(names, self._indices)}
        self._out_feature_channels = {n: info[i]["num_chs"] for n, i in zip(names, self._indices)}
        self._size_divisibility = max(self._out_feature_strides.values())

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility}  # current detectron2 reads this too

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_feature_channels[n], stride=self._out_feature_strides[n])
                for n in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [B, 3, H, W] (multiples of the largest stride) -> {"res2": [B, C2, H/4, W/4], ...}."""
        check_input_size(x, self._size_divisibility, type(self).__name__)
        maps = self.model.forward_intermediates(x, indices=self._indices, intermediates_only=True)
        return dict(zip(self._out_features, maps))


def timm_model_from_config(cfg) -> nn.Module:
    """timm model MODEL.TIMM.NAME without head (MODEL.TIMM.KWARGS, DROP_PATH_RATE), patched by
    ``dge.patch`` with MODEL.DGE's options when MODEL.DGE.ENABLED (per block fitted to its
    window with MODEL.TIMM.FIT_WINDOWS). Weights: random; MODEL.WEIGHTS loads them later."""
    t = cfg.MODEL.TIMM
    if not timm.is_model(t.NAME):
        raise ValueError(f"MODEL.TIMM.NAME {t.NAME!r} is not a timm model (timm {timm.__version__})")
    model = timm.create_model(t.NAME, pretrained=False, num_classes=0, drop_path_rate=t.DROP_PATH_RATE,
                              **dict(t.KWARGS))
    if not cfg.MODEL.DGE.ENABLED:
        return model
    options = DGEOptions.from_config(cfg.MODEL.DGE)
    return patch(model, fit_to_windows(options) if t.FIT_WINDOWS else options)


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape: ShapeSpec) -> TimmBackbone:
    """``TimmBackbone`` over ``timm_model_from_config`` at MODEL.TIMM.OUT_INDICES."""
    if input_shape.channels != 3:
        raise ValueError(f"build_timm_backbone takes RGB images; got {input_shape.channels} channels")
    return TimmBackbone(timm_model_from_config(cfg), cfg.MODEL.TIMM.OUT_INDICES)


@BACKBONE_REGISTRY.register()
def build_timm_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``build_timm_backbone`` + FPN (MODEL.FPN.*, max-pooled p6) over MODEL.FPN.IN_FEATURES, or
    ViTDet's simple feature pyramid where the backbone has one output (a plain ViT)."""
    bottom_up = build_timm_backbone(cfg, input_shape)
    names = list(bottom_up.output_shape())
    if len(names) == 1:
        return SimpleFeaturePyramid(bottom_up, cfg.MODEL.FPN.OUT_CHANNELS, in_feature=names[0])
    absent = [f for f in cfg.MODEL.FPN.IN_FEATURES if f not in names]
    if absent:
        raise ValueError(f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)}: {absent} not among the timm "
                         f"backbone's outputs {list(names)} (MODEL.TIMM.OUT_INDICES)")
    return fpn_from_config(cfg, bottom_up)
