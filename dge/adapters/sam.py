"""timm's SAM ``Block`` with its ``Attention`` (``VisionTransformerSAM``: SAM's image encoder,
ViTDet's design): W×W windows of the zero-padded map, global blocks between, decomposed
relative positions; blocks take maps [B, H, W, C].

Each pooled query attends to its window's keys (``dge.layers.windows``): the region size
must divide the window, so that regions tile windows (SAM's windows of 14: Φ = {1, 2}). The
relative-position bias of a query is taken at its centre.
"""
import math
from typing import Optional, Tuple

import torch
from timm.models import vision_transformer_sam as sam
from torch import nn

from dge.layers import BlockCall, BlockCost, DGEOptions
from dge.layers.kernels import sdpa
from dge.layers.windows import partition_windows, rel_pos_bias, windowed_attention

from .base import (
    Stage,
    TimmAdapter,
    global_attention_cost,
    head_norm,
    place_queries,
    project_qkv,
    register_adapter,
    split_heads,
    windowed_attention_cost,
)

__all__ = ["SamAdapter"]


@register_adapter
class SamAdapter(TimmAdapter):
    block_type = sam.Block
    attention_type = sam.Attention
    family = "timm's SAM Block (VisionTransformerSAM: SAM's encoder, ViTDet), windowed or global"

    @classmethod
    def window(cls, block: nn.Module) -> Optional[Tuple[int, int]]:
        return (block.window_size, block.window_size) if block.window_size > 0 else None

    @classmethod
    def check(cls, block: nn.Module, label: str, stage: Stage, options: DGEOptions) -> None:
        if getattr(block.attn, "rope", None) is not None:
            raise TypeError(f"dge.patch: {label} has a rotary SAM attention, which it does not support")
        super().check(block, label, stage, options)

    def prepare(self, x: torch.Tensor, hw=None) -> BlockCall:
        """SAM's ``blk(x)`` on a map [B, H, W, C] (the output is a map too), or tokens
        [B, H*W, C] with ``hw``."""
        if x.dim() == 4:
            return BlockCall(x.flatten(1, 2), tuple(x.shape[1:3]), self.forward_queries, lambda y: y.view(x.shape))
        return BlockCall(x, tuple(hw) if hw is not None else self.grid.read(), self.forward_queries)

    def _attention(self, queries, context, hw, centers, rows) -> torch.Tensor:
        """SAM's attention (ViTDet's): in W×W windows of the zero-padded map, or global
        (``window_size`` 0), with the decomposed relative-position bias at each query's centre."""
        attn, window = self.attn, self.original.window_size
        if window > 0:
            x = self._windowed(queries, context, hw, centers, rows, window)
        else:
            x = self._global(queries, context, hw, centers, rows)
        return attn.proj_drop(attn.proj(x.reshape(queries.shape[0], queries.shape[1], -1)))

    def _windowed(self, queries, context, hw, centers, rows, window: int) -> torch.Tensor:
        """-> [T, A]: each query against its window of the vanilla block's padded windows."""
        attn = self.attn
        q, k, v = project_qkv(attn, queries.reshape(-1, queries.shape[-1]), partition_windows(context, hw, window))
        q, k = head_norm(attn.q_norm, q, attn.num_heads), head_norm(attn.k_norm, k, attn.num_heads)
        place = place_queries(queries, centers, rows, context.shape[0], hw, window)
        bias = None
        if attn.use_rel_pos:
            tables = (attn.rel_pos_h, attn.rel_pos_w)
            bias = lambda qs, slots: rel_pos_bias(qs, slots.centers, tables, (window, window))  # noqa: E731
        return windowed_attention(q, k, v, place, attn.num_heads, attn.attn_drop.p if self.training else 0.0, bias)

    def _global(self, queries, context, hw, centers, rows) -> torch.Tensor:
        """-> [B', M, A]: global attention, each image's queries padded (the bias is per query)."""
        attn = self.attn
        q, k, v = project_qkv(attn, queries, context)
        if rows is not None:
            q, centers = rows.pad(q[0]), rows.pad(centers[0])
        q, k, v = split_heads(attn, q, k, v)
        bias = rel_pos_bias(q, centers, (attn.rel_pos_h, attn.rel_pos_w), hw) if attn.use_rel_pos else None
        x = sdpa(q, k, v, attn.attn_drop.p if self.training else 0.0, bias)
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(x.shape[0], x.shape[2], -1)
        return rows.unpad(x) if rows is not None else x

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        """Windowed: ``windowed_attention_cost``. Global: the attention is per query. Relative
        positions: the vanilla block takes q·R at each query-key offset (kh + kw per query),
        the DGE form at every whole offset, 2k - 1 a side, to interpolate at pooled centres."""
        window, attn = self.original.window_size, self.attn
        keys = (window, window) if window > 0 else hw
        a = attn.num_heads * attn.head_dim
        rel = (sum(keys) * a, sum(2 * k - 1 for k in keys) * a) if attn.use_rel_pos else (0.0, 0.0)
        if window > 0:
            return windowed_attention_cost(self, hw, keys, rel)
        cost = global_attention_cost(self, hw, num_extra)
        return BlockCost(cost.fixed, cost.per_query + rel[1], cost.vanilla_delta + math.prod(hw) * (rel[0] - rel[1]))
