"""detectron2 front door of the PVT / DPVT pyramid (``dge.models.pvt``): a ``Backbone`` with outputs
res2..res5 (strides 4..32) and the FPN builder (p2..p6). DPVT and DGE are config switches:
MODEL.PVT.ATTENTION and MODEL.DGE.ENABLED."""
from typing import Dict, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool

from dge.layers import ATTENTION_KINDS, DGEOptions
from dge.models.parts import check_input_size, tokens_to_map
from dge.models.pvt import PVT_SIZES, PyramidVisionTransformer, pvt_kwargs

__all__ = ["PVTBackbone", "build_pvt_backbone", "build_pvt_fpn_backbone", "fpn_from_config", "pyramid_from_config"]

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class PVTBackbone(Backbone):
    """The pyramid's stages as a detectron2 backbone.

    Args:
        pyramid: a ``PyramidVisionTransformer`` without class token (``global_pool="avg"``); only
            its stages up to the last requested output are kept (no final norm, no head, as the
            official PVT detection backbone).
        out_features: subset of res2..res5.
        freeze_at: 0 trains everything; 1 freezes the first patch embedding (and its position
            embedding); k in 2..4 freezes the stages of res2 .. res{k}.
    """

    def __init__(
        self, pyramid: PyramidVisionTransformer, out_features: Sequence[str] = STAGE_NAMES, freeze_at: int = 0
    ):
        super().__init__()
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if not out_features or unknown:
            raise ValueError(f"out_features must be a non-empty subset of {STAGE_NAMES}; got {list(out_features)}")
        if pyramid.stages[-1].num_extra_tokens:
            raise ValueError("the detection backbone takes a pyramid without class token (global_pool='avg')")
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        self.stages = pyramid.stages[:num_stages]
        self._out_features = [f for f in STAGE_NAMES if f in out_features]
        self._out_feature_strides, self._out_feature_channels = {}, {}
        stride = 1
        for name, stage in zip(STAGE_NAMES, self.stages):
            stride *= stage.patch_size
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = stage.pos_embed.shape[-1]
        self._size_divisibility = stride
        self.freeze(freeze_at)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # Current detectron2 reads this beside size_divisibility; v0.6 ignores it.
        return {"size_divisibility": self._size_divisibility}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def freeze(self, freeze_at: int = 0) -> "PVTBackbone":
        if not 0 <= freeze_at <= len(STAGE_NAMES):
            raise ValueError(f"MODEL.PVT.FREEZE_AT must be in 0..{len(STAGE_NAMES)}; got {freeze_at}")
        frozen = []
        if freeze_at >= 1:
            frozen += [self.stages[0].patch_embed, self.stages[0].pos_embed]
        frozen += list(self.stages[: max(freeze_at - 1, 0)])
        for item in frozen:
            for p in item.parameters() if isinstance(item, torch.nn.Module) else [item]:
                p.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [B, C, H, W] (H, W >= 32; detectron2 pads to multiples of 32) -> {"res2": [B, 64,
        H/4, W/4], ...} (floor division, as the patch embeddings)."""
        check_input_size(x, self._size_divisibility, type(self).__name__)
        outputs = {}
        for name, stage in zip(STAGE_NAMES, self.stages):
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw)  # channels-last view: the next patch embedding reads it as is
            if name in self._out_features:
                outputs[name] = x.contiguous()
        return outputs


def pyramid_from_config(cfg, in_chans: int = 3) -> PyramidVisionTransformer:
    """The pyramid MODEL.PVT / MODEL.DGE describe, without class token or head."""
    p, d = cfg.MODEL.PVT, cfg.MODEL.DGE
    if p.SIZE not in PVT_SIZES:
        raise ValueError(f"MODEL.PVT.SIZE must be one of {tuple(PVT_SIZES)}; got {p.SIZE!r}")
    if p.ATTENTION not in ATTENTION_KINDS:
        raise ValueError(f"MODEL.PVT.ATTENTION must be one of {tuple(ATTENTION_KINDS)}; got {p.ATTENTION!r}")
    dge = DGEOptions.from_config(d) if d.ENABLED else None
    return PyramidVisionTransformer(
        img_size=p.PRETRAIN_IMG_SIZE,
        in_chans=in_chans,
        num_classes=0,
        global_pool="avg",
        num_points=p.NUM_POINTS,
        drop_path_rate=p.DROP_PATH_RATE,
        dge=dge,
        **pvt_kwargs(p.SIZE, p.ATTENTION),
    )


@BACKBONE_REGISTRY.register()
def build_pvt_backbone(cfg, input_shape: ShapeSpec) -> PVTBackbone:
    """PVT / DPVT (MODEL.PVT.ATTENTION), with DGE when MODEL.DGE.ENABLED."""
    pyramid = pyramid_from_config(cfg, input_shape.channels)
    return PVTBackbone(pyramid, cfg.MODEL.PVT.OUT_FEATURES, cfg.MODEL.PVT.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_pvt_fpn_backbone(cfg, input_shape: ShapeSpec) -> FPN:
    """``build_pvt_backbone`` + FPN (MODEL.FPN.*) with a max-pooled p6, as
    detectron2's ``build_resnet_fpn_backbone``."""
    return fpn_from_config(cfg, build_pvt_backbone(cfg, input_shape))


def fpn_from_config(cfg, bottom_up: Backbone) -> FPN:
    """An FPN (MODEL.FPN.*) with a max-pooled p6 on ``bottom_up``."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
