"""PVT / DPVT / DeiT and plain-ViT (ViTDet) backbones (with or without DGE) for timm and detectron2."""
from . import deit as _deit  # noqa: F401  (timm registration)
from .convert import checkpoint_filter_fn, convert_deit_state_dict, convert_pvt_state_dict
from .d2 import PVTBackbone, build_pvt_backbone, build_pvt_fpn_backbone
from .deit import DeiT
from .pvt import PyramidVisionTransformer
from .vitdet import SimpleFeaturePyramid, build_vitdet_backbone

__all__ = [
    "DeiT",
    "PVTBackbone",
    "PyramidVisionTransformer",
    "SimpleFeaturePyramid",
    "build_pvt_backbone",
    "build_pvt_fpn_backbone",
    "build_vitdet_backbone",
    "checkpoint_filter_fn",
    "convert_deit_state_dict",
    "convert_pvt_state_dict",
]
