"""dge's own blocks (``dge.layers.EncoderBlock``: PVT, DPVT, DeiT) need no adapter: they are
in the block protocol already, and their models call them with the map size. ``patch`` wraps
a vanilla ``pvt_small`` as ``pvt_small_dge`` is built, stage by stage."""
from torch import nn

from dge.layers import EncoderBlock

from .base import Adapter, Stage, register_adapter

__all__ = ["NativeBlock"]


@register_adapter
class NativeBlock(Adapter):
    block_type = EncoderBlock
    family = "dge's EncoderBlock (PVT, DPVT, DeiT)"

    @classmethod
    def wrap(cls, block: nn.Module, stage: Stage) -> nn.Module:
        return block

    @staticmethod
    def unwrap(adapted: nn.Module) -> nn.Module:
        return adapted
