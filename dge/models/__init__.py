"""dge's own model families in timm's shape (torch and timm only): PVT v1 / DPVT and DeiT, with
or without DGE, registered with timm (``pvt_small``, ``pvt_small_dge``, ``dpvt_small``,
``deit_small_dge``, ...), and the one converter of official PVT v1, vtpack, DeiT and timm
checkpoints onto them and onto patched timm models."""
from .convert import (
    Conversion,
    checkpoint_filter_fn,
    convert_deit_state_dict,
    convert_pvt_state_dict,
    convert_vitdet_state_dict,
    unwrap_checkpoint,
)
from .convert_timm import convert_timm_state_dict
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
    "convert_timm_state_dict",
    "convert_vitdet_state_dict",
    "pvt_kwargs",
    "unwrap_checkpoint",
]
