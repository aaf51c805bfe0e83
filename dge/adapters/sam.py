"""timm's SAM ``Block`` with its ``Attention`` (``VisionTransformerSAM``: SAM's image encoder,
ViTDet's design): W×W windows of the zero-padded map, global blocks between, decomposed
relative positions; blocks take maps [B, H, W, C].

Each pooled query attends to its window's keys (``dge.layers.windows``): the region size
must divide the window, so that regions tile windows (SAM's windows of 14: Φ = {1, 2}). The
relative-position bias of a query is taken at its centre.
"""
import math
from typing import Tuple

import torch
from timm.models import vision_transformer_sam as sam
from torch import nn

from dge.layers import BlockCall, BlockCost, DGEOptions
from dge.layers.kernels import sdpa
from dge.layers.rows import row_images
from dge.layers.windows import rel_pos_bias, window_rows

from .base import Stage, TimmAdapter, linear_cost, norm_cost, project_qkv, register_adapter, split_heads

__all__ = ["SamAdapter"]


@register_adapter
class SamAdapter(TimmAdapter):
    block_type = sam.Block
    attention_type = sam.Attention
    family = "timm's SAM Block (VisionTransformerSAM: SAM's encoder, ViTDet), windowed or global"

    @classmethod
    def check(cls, block: nn.Module, label: str, stage: Stage, options: DGEOptions) -> None:
        if getattr(block.attn, "rope", None) is not None:
            raise TypeError(f"dge.patch: {label} has a rotary SAM attention, which it does not support")
        region = options.region_size or max(options.granularities)
        if block.window_size % region:
            raise ValueError(
                f"dge.patch: region size {region} does not divide {label}'s window size {block.window_size}; "
                f"regions must tile windows (e.g. granularities (1, 2) for windows of 14)"
            )

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
        heads, d = attn.num_heads, attn.head_dim
        b, c = context.shape[0], context.shape[-1]
        if window > 0:  # the vanilla block's padded windows: [B·nW, W², C]
            context = sam.window_partition(context.view(b, hw[0], hw[1], c), window)[0].flatten(1, 2)
        q, k, v = project_qkv(attn, queries, context)
        key_hw = (window, window) if window > 0 else hw
        if window > 0:
            images = rows.image_index if rows is not None else row_images(b, queries.shape[1], q.device)
            place = window_rows(centers.reshape(-1, 2), images, b, hw, window)
            q, centers = place.scatter(q.reshape(-1, q.shape[-1])), place.centers
        elif rows is not None:
            q, centers = rows.pad(q[0]), rows.pad(centers[0])
        q, k, v = split_heads(attn, q, k, v)
        bias = rel_pos_bias(q, centers, (attn.rel_pos_h, attn.rel_pos_w), key_hw) if attn.use_rel_pos else None
        x = sdpa(q, k, v, attn.attn_drop.p if self.training else 0.0, bias)
        # a copy in the contiguous layout: ONNX's decomposition of biased SDPA strides its output
        # otherwise than export recorded, and a reshape recorded as a view then fails
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(x.shape[0], x.shape[2], heads * d)
        if window > 0:
            x = place.gather(x)
        elif rows is not None:
            x = rows.unpad(x)
        return attn.proj_drop(attn.proj(x.reshape(queries.shape[0], queries.shape[1], -1)))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        """Windowed: both forms project and attend over every W² slot of the zero-padded
        windows (fixed); the vanilla block also projects its padding tokens' queries and
        outputs, which the DGE form skips. Global: the attention is per query. Relative
        positions: the vanilla block takes q·R at each query-key offset (kh + kw per query),
        the DGE form at every whole offset, 2k - 1 a side, to interpolate at pooled centres."""
        window, attn = self.original.window_size, self.attn
        n, c, a = hw[0] * hw[1], self.dim, attn.num_heads * attn.head_dim
        keys = (window, window) if window > 0 else hw
        rel_vanilla = sum(keys) * a if attn.use_rel_pos else 0.0
        rel_dge = sum(2 * k - 1 for k in keys) * a if attn.use_rel_pos else 0.0
        rowwise = norm_cost(self.norm1, c) + c * a + linear_cost(attn.proj) + norm_cost(self.norm2, c)
        rowwise += linear_cost(self.mlp)
        if window == 0:
            fixed = n * (norm_cost(self.norm1, c) + 2 * c * a + norm_cost(attn.k_norm, a))
            per_query = rowwise + norm_cost(attn.q_norm, a) + 2.0 * n * a + rel_dge
            return BlockCost(fixed, per_query, n * (rel_vanilla - rel_dge))
        padded = math.prod(-(-s // window) * window for s in hw)
        slot = 2 * c * a + norm_cost(attn.q_norm, a) + norm_cost(attn.k_norm, a) + 2.0 * window * window * a
        fixed = n * norm_cost(self.norm1, c) + padded * (slot + rel_dge)
        padding = (padded - n) * (c * a + linear_cost(attn.proj))  # the vanilla block's only
        return BlockCost(fixed, rowwise, padding + padded * (rel_vanilla - rel_dge))
