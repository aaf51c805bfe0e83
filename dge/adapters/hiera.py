"""timm's Hiera blocks: SAM 2's image encoder (``HieraDet``: ``sam2_hiera_*``, maps [B, H, W, C],
windows of the zero-padded map per stage and a few global blocks) and Hiera (``hiera_*``:
tokens kept in an "unrolled" order, mask-unit attention in early stages, global later).

Windowed blocks attend per window as SAM's do (``dge.layers.windows``); global blocks attend
over packed rows (``dge.layers.kernels.attend``). The blocks that pool their queries at a stage
transition (stride-2 max pooling, a wider output) are kept dense: they change the map, which
a DGE block's residual cannot. Hiera's adapter takes its block's tokens from the unrolled order
to raster order and back (two gathers a block), with the permutation read off the model's
own ``reroll``; a mask unit is then a window of the raster map.
"""
import math
from typing import Optional, Tuple

import torch
from timm.models import hiera, hieradet_sam2
from torch import nn

from dge.layers import BlockCall, BlockCost, DGEOptions
from dge.layers.kernels import attend
from dge.layers.windows import partition_windows, windowed_attention

from .base import (
    Stage,
    TimmAdapter,
    global_attention_cost,
    place_queries,
    project_qkv,
    register_adapter,
    windowed_attention_cost,
)

__all__ = ["HieraAdapter", "HieraDetAdapter"]


class _WindowedOrGlobal(TimmAdapter):
    """Attention without relative positions: per window of the padded map, or global."""

    def attention_window(self) -> Optional[Tuple[int, int]]:
        """The wrapped block's window (``window``), None for global attention."""
        return self.window(self.original)

    def _attention(self, queries, context, hw, centers, rows) -> torch.Tensor:
        attn, window = self.attn, self.attention_window()
        heads = getattr(attn, "num_heads", None) or attn.heads
        if window is not None:
            q, k, v = project_qkv(attn, queries.reshape(-1, queries.shape[-1]), partition_windows(context, hw, window))
            place = place_queries(queries, centers, rows, context.shape[0], hw, window)
            x = windowed_attention(q, k, v, place, heads).view(queries.shape[0], queries.shape[1], -1)
        else:
            q, k, v = project_qkv(attn, queries, context)
            q, k, v = (t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
            x = attend(q, k, v, rows)
        return attn.proj(x)

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        window = self.attention_window()
        if window is not None:
            return windowed_attention_cost(self, hw, window)
        return global_attention_cost(self, hw, num_extra)


@register_adapter
class HieraDetAdapter(_WindowedOrGlobal):
    block_type = hieradet_sam2.MultiScaleBlock
    attention_type = hieradet_sam2.MultiScaleAttention
    family = "timm's HieraDet block (SAM 2's image encoder), windowed or global; query pooling kept dense"

    @classmethod
    def dense(cls, block: nn.Module) -> bool:
        return block.q_stride is not None or block.dim != block.dim_out

    @classmethod
    def window(cls, block: nn.Module) -> Optional[Tuple[int, int]]:
        return tuple(block.window_size) if block.is_windowed else None

    def prepare(self, x: torch.Tensor, hw=None) -> BlockCall:
        """HieraDet's ``blk(x)`` on a map [B, H, W, C] (the output is a map too)."""
        return BlockCall(x.flatten(1, 2), tuple(x.shape[1:3]), self.forward_queries, lambda y: y.view(x.shape))


@register_adapter
class HieraAdapter(_WindowedOrGlobal):
    block_type = hiera.HieraBlock
    attention_type = hiera.MaskUnitAttention
    family = "timm's Hiera block (mask-unit or global attention); query pooling kept dense"

    @classmethod
    def dense(cls, block: nn.Module) -> bool:
        return block.dim != block.dim_out or block.attn.q_stride > 1

    @classmethod
    def window(cls, block: nn.Module) -> Optional[Tuple[int, int]]:
        """A mask unit (square) at the block's resolution, or None (global attention)."""
        if not block.attn.use_mask_unit_attn:
            return None
        side = math.isqrt(block.attn.window_size)
        return side, side

    @classmethod
    def check(cls, block: nn.Module, label: str, stage: Stage, options: DGEOptions) -> None:
        super().check(block, label, stage, options)
        if getattr(stage.model, "reroll", None) is None:
            raise TypeError(f"dge.patch: {label} is a Hiera block outside a Hiera model (its token order is the model's)")

    def __init__(self, block: nn.Module, stage: Optional[Stage] = None):
        super().__init__(block, stage)
        index = next(i for i, b in enumerate(stage.model.blocks) if b is block)
        _, size = stage.model.reroll.schedule[index]
        order = stage.model.reroll(torch.arange(math.prod(size), dtype=torch.float32).view(1, -1, 1), index)
        raster = order.flatten().round().long()  # the unrolled position of each raster token
        self.hw = tuple(size)
        self.register_buffer("raster", raster, persistent=False)
        self.register_buffer("unrolled", torch.argsort(raster), persistent=False)

    def prepare(self, x: torch.Tensor, hw=None) -> BlockCall:
        """Hiera's ``blk(x)`` on unrolled tokens [B, N, C]: the tokens in raster order, and back."""
        return BlockCall(x.index_select(1, self.raster), self.hw, self.forward_queries,
                         lambda y: y.index_select(1, self.unrolled))
