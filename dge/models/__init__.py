"""dge's own model families in timm's shape (torch and timm only): PVT v1 / DPVT and DeiT, with
or without DGE, registered with timm (``pvt_small``, ``pvt_small_dge``, ``dpvt_small``,
``deit_small_dge``, ...), and the one converter of official PVT v1, vtpack, DeiT and timm ViT
checkpoints onto them."""
from .convert import (
    Conversion,
    checkpoint_filter_fn,
    convert_deit_state_dict,
    convert_pvt_state_dict,
    convert_vitdet_state_dict,
    unwrap_checkpoint,
)
from .deit import DEIT_SIZES, DeiT
from .pvt import PVT_SIZES, PyramidStage, PyramidVisionTransformer, pvt_kwargs

__all__ = [
    "Conversion",
    "DEIT_SIZES",
    "DeiT",
    "PVT_SIZES",
    "PyramidStage",
    "PyramidVisionTransformer",
    "checkpoint_filter_fn",
    "convert_deit_state_dict",
    "convert_pvt_state_dict",
    "convert_vitdet_state_dict",
    "pvt_kwargs",
    "unwrap_checkpoint",
]
