"""A plain ViT detection backbone with ViTDet's simple feature pyramid (Li et al., "Exploring
Plain Vision Transformer Backbones for Object Detection", 2022), for detectron2 v0.6, which
has no ViTDet code. The ViT is timm's ``VisionTransformerSAM``: ViTDet's design (windowed
blocks over the zero-padded map, a few global blocks, decomposed relative positions, an
absolute position embedding) without SAM's neck. With MODEL.DGE.ENABLED its blocks are DGE
blocks (``dge.patch``): each pooled query attends to its window's keys.
"""
from typing import Dict, Optional

import timm
import torch
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from timm.layers import LayerNorm2d
from torch import nn

from dge.layers import DGEOptions
from dge.adapters import patch
from dge.models.parts import check_input_size

__all__ = ["VIT_SIZES", "SimpleFeaturePyramid", "build_vitdet_backbone", "vit_from_config"]

# ViTDet's ViT-B / L / H (global blocks evenly spaced), and two smaller ones for short runs.
VIT_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, global_attn_indexes=(2, 5, 8, 11)),
    "small": dict(embed_dim=384, depth=12, num_heads=6, global_attn_indexes=(2, 5, 8, 11)),
    "base": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
PYRAMID_NAMES = ("p2", "p3", "p4", "p5")


def _scale_stage(dim: int, scale: float) -> nn.Module:
    """ViTDet's rescaling of the stride-16 map by 4 (two transposed convs), 2, 1 or 1/2."""
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        )
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
    if scale == 1.0:
        return nn.Identity()
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2)
    raise ValueError(f"SimpleFeaturePyramid scales are among 4, 2, 1, 0.5; got {scale}")


class SimpleFeaturePyramid(Backbone):
    """p2..p5 from a plain ViT's last (stride-16) map rescaled by 4, 2, 1 and 1/2, each followed
    by a 1×1 and a 3×3 conv with LayerNorm, and p6 by max pooling p5 (ViTDet, Fig. 2c).

    Args:
        bottom_up: a timm ``VisionTransformerSAM`` without neck (``neck_chans=0``), patch size
            16, read through ``forward_features``; or a detectron2 ``Backbone`` whose output
            ``in_feature`` is the map (``TimmBackbone`` over a plain ViT).
        out_channels: channels of every level.
        in_feature: the output of a ``Backbone`` ``bottom_up``; None for a ViT.
    """

    def __init__(self, bottom_up: nn.Module, out_channels: int = 256, in_feature: Optional[str] = None):
        super().__init__()
        self.bottom_up = bottom_up  # FPN's name for the network it reads, which tools look for
        self.in_feature = in_feature
        if in_feature is None:
            dim, stride = bottom_up.embed_dim, bottom_up.patch_embed.patch_size[0]
        else:
            shape = bottom_up.output_shape()[in_feature]
            dim, stride = shape.channels, shape.stride
        if stride % 4:
            raise ValueError(f"the simple feature pyramid rescales a map by 4 ... 1/2; its stride {stride} is not a "
                             "multiple of 4")
        self.stages = nn.ModuleList()
        for scale in (4.0, 2.0, 1.0, 0.5):
            width = {4.0: dim // 4, 2.0: dim // 2}.get(scale, dim)
            self.stages.append(nn.Sequential(
                _scale_stage(dim, scale),
                Conv2d(width, out_channels, 1, bias=False, norm=LayerNorm2d(out_channels)),
                Conv2d(out_channels, out_channels, 3, padding=1, bias=False, norm=LayerNorm2d(out_channels)),
            ))
        self.top_block = LastLevelMaxPool()
        self._out_features = list(PYRAMID_NAMES) + ["p6"]
        self._strides = {name: int(stride / s) for name, s in zip(PYRAMID_NAMES, (4.0, 2.0, 1.0, 0.5))}
        self._strides["p6"] = 2 * self._strides["p5"]
        self._out_channels = out_channels

    @property
    def size_divisibility(self) -> int:
        return self._strides["p5"]

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility}  # current detectron2 reads this too

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {n: ShapeSpec(channels=self._out_channels, stride=self._strides[n]) for n in self._out_features}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [B, 3, H, W] (H, W multiples of 32) -> {"p2": [B, C, H/4, W/4], ..., "p6"}."""
        check_input_size(x, self.size_divisibility, type(self).__name__)
        if self.in_feature is None:
            features = self.bottom_up.forward_features(x)  # [B, D, H/16, W/16]
        else:
            features = self.bottom_up(x)[self.in_feature]
        outputs = {name: stage(features) for name, stage in zip(PYRAMID_NAMES, self.stages)}
        outputs["p6"] = self.top_block(outputs["p5"])[0]
        return outputs


def vit_from_config(cfg) -> nn.Module:
    """The ViT MODEL.VIT describes (timm's ``VisionTransformerSAM``, no neck), patched by
    ``dge.patch`` with MODEL.DGE's options when MODEL.DGE.ENABLED."""
    v = cfg.MODEL.VIT
    if v.SIZE not in VIT_SIZES:
        raise ValueError(f"MODEL.VIT.SIZE must be one of {tuple(VIT_SIZES)}; got {v.SIZE!r}")
    size = dict(VIT_SIZES[v.SIZE])
    if v.DEPTH:
        size["depth"] = v.DEPTH
    if v.GLOBAL_BLOCKS:
        size["global_attn_indexes"] = tuple(v.GLOBAL_BLOCKS)
    if max(size["global_attn_indexes"]) >= size["depth"]:
        raise ValueError(
            f"MODEL.VIT.GLOBAL_BLOCKS {size['global_attn_indexes']} must index blocks 0..{size['depth'] - 1}"
        )
    vit = timm.create_model(
        "samvit_base_patch16", pretrained=False, img_size=v.PRETRAIN_IMG_SIZE, window_size=v.WINDOW_SIZE,
        drop_path_rate=v.DROP_PATH_RATE, neck_chans=0, num_classes=0, use_rel_pos=True,
        init_values=1.0 if v.LAYER_SCALE else None, **size,
    )
    vit.neck = nn.Identity()  # without SAM's neck timm puts a final norm there; ViTDet has none
    return patch(vit, DGEOptions.from_config(cfg.MODEL.DGE)) if cfg.MODEL.DGE.ENABLED else vit


@BACKBONE_REGISTRY.register()
def build_vitdet_backbone(cfg, input_shape: ShapeSpec) -> SimpleFeaturePyramid:
    """A plain ViT (MODEL.VIT, with DGE when MODEL.DGE.ENABLED) and ViTDet's simple feature
    pyramid (p2..p6, MODEL.FPN.OUT_CHANNELS)."""
    if input_shape.channels != 3:
        raise ValueError(f"build_vitdet_backbone takes RGB images; got {input_shape.channels} channels")
    return SimpleFeaturePyramid(vit_from_config(cfg), cfg.MODEL.FPN.OUT_CHANNELS)
