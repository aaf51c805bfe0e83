"""DGE on models you already have: ``patch`` / ``unpatch`` and one adapter per block family,
each putting that family's blocks into the block protocol (``dge.layers.protocol``).

* ``vit``: timm's ``Block`` + ``Attention`` (ViT, DeiT III, MAE, DINOv2);
* ``eva``: timm's ``EvaBlock`` + ``EvaAttention`` (EVA, EVA-02: rotary embeddings);
* ``sam``: timm's SAM ``Block`` (SAM's encoder, ViTDet: windowed attention);
* ``swin``: timm's Swin v1 and v2 blocks (shifted windows: routed on the rolled map);
* ``pvt_v2``: timm's PVT v2 block (SR or linear attention; its MLP's depthwise conv on the
  dense map, through the encoder's ``QueryMap``);
* ``hiera``: timm's Hiera (mask units, unrolled token order) and SAM 2's Hiera (windows);
  query-pooling blocks at stage transitions stay dense;
* ``native``: dge's own ``EncoderBlock`` (PVT, DPVT, DeiT), which needs none.

A new family is one module here with one ``@register_adapter`` class (and, for a model
whose stages ``model_stages`` does not find, one ``@register_stages`` function), plus one
case in tests/adapters/test_family_contract.py.
"""
from . import eva, hiera, native, pvt_v2, sam, swin, vit  # noqa: F401  (registration: one adapter per family)
from .base import ADAPTERS, Adapter, Stage, TimmAdapter, TokenGrid, find_adapter, register_adapter
from .patch import STAGE_FINDERS, fit_to_windows, is_patched, model_stages, patch, register_stages, unpatch

__all__ = [
    "ADAPTERS",
    "Adapter",
    "STAGE_FINDERS",
    "Stage",
    "TimmAdapter",
    "TokenGrid",
    "find_adapter",
    "fit_to_windows",
    "is_patched",
    "model_stages",
    "patch",
    "register_adapter",
    "register_stages",
    "unpatch",
]
