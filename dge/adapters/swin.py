"""timm's Swin Transformer blocks: v1 (``SwinTransformerBlock``, a learned relative-position
table) and v2 (``SwinTransformerV2Block``: post-norm, cosine attention, the bias from a
log-spaced continuous position MLP).

A shifted block rolls its map by half a window before partitioning; its DGE form routes on
the rolled map (``prepare`` rolls, ``restore`` rolls back), so regions tile the windows of
regular and shifted blocks alike, and the region size must divide the window. Each pooled
query attends to its window's dense keys under the vanilla block's mask, taken at the slot
of the token under its centre. The relative-position bias is taken at its centre: a pooled
query's centre lies on a half-token grid (the mean of consecutive token centres), so the
bias is read from a table at half-token steps: v1's table upsampled bilinearly (whole
offsets keep their entries), v2's position MLP evaluated there.

Windows of 8 or 16 (shift 4 or 8) take Φ = {1, 2, 4}: no query straddles the sub-windows a
shifted window's mask separates. Swin-T's windows of 7 (shift 3) take region size 7, Φ = {1, 7}:
exact at all-fine routing; a 7×7 query of a shifted block's last window row or column pools
tokens of two sub-windows and attends under the mask of the one at its centre.
"""
import math
from typing import Optional, Tuple

import torch
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swin2
from torch import nn
from torch.nn import functional as F

from dge.layers import BlockCall, BlockCost, token_centers
from dge.layers.block import drop_path_rows
from dge.layers.windows import WindowRows, partition_windows, windowed_attention

from .base import (
    TimmAdapter,
    linear_cost,
    place_queries,
    project_qkv,
    register_adapter,
    windowed_attention_cost,
)

__all__ = ["SwinAdapter", "SwinV2Adapter", "half_step_bias"]


def half_step_bias(table: torch.Tensor, centers: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """A relative-position bias at half-token steps, ``table`` [heads, 4Wh - 3, 4Ww - 3] (entry
    (2(Wh - 1) + 2dy, 2(Ww - 1) + 2dx) for a query dy, dx from a key), at query centres
    [N, Wh·Ww, 2] of window slots -> [N, heads, Wh·Ww, Wh·Ww] (key slots row-major)."""
    keys = token_centers(window[0], window[1], device=centers.device)  # [Wh·Ww, 2]
    offsets = centers[:, :, None, :] - keys  # [N, slots, keys, 2], multiples of 0.5 for pooled queries
    rows, cols = table.shape[1], table.shape[2]
    iy = (2 * offsets[..., 0] + (rows - 1) / 2).round().long().clamp_(0, rows - 1)
    ix = (2 * offsets[..., 1] + (cols - 1) / 2).round().long().clamp_(0, cols - 1)  # (empty slots: clamped)
    return table.flatten(1)[:, iy * cols + ix].transpose(0, 1)


@register_adapter
class SwinAdapter(TimmAdapter):
    block_type = swin.SwinTransformerBlock
    attention_type = swin.WindowAttention
    family = "timm's Swin v1 block (SwinTransformerBlock)"

    @classmethod
    def window(cls, block: nn.Module) -> Optional[Tuple[int, int]]:
        return tuple(block.window_size)

    def prepare(self, x: torch.Tensor, hw=None) -> BlockCall:
        """Swin's ``blk(x)`` on a map [B, H, W, C]: tokens of the map rolled by the block's shift."""
        shift = tuple(self.original.shift_size)
        rolled = torch.roll(x, (-shift[0], -shift[1]), (1, 2)) if any(shift) else x

        def restore(y: torch.Tensor) -> torch.Tensor:
            y = y.view(x.shape)
            return torch.roll(y, shift, (1, 2)) if any(shift) else y

        return BlockCall(rolled.flatten(1, 2), tuple(x.shape[1:3]), self.forward_queries, restore)

    def _attention(self, queries, context, hw, centers, rows) -> torch.Tensor:
        """Each query against its window of the rolled, zero-padded map (``dge.layers.windows``)."""
        attn, window = self.attn, tuple(self.original.window_size)
        b, c = context.shape[0], queries.shape[-1]
        q, k, v = project_qkv(attn, queries.reshape(-1, c), partition_windows(context, hw, window))
        q, k, scale = self._logits(q, k)
        place = place_queries(queries, centers, rows, b, hw, window)
        bias = lambda qs, slots: self._bias(slots, b, hw, window, qs.dtype)  # noqa: E731
        x = windowed_attention(q, k, v, place, attn.num_heads, attn.attn_drop.p if self.training else 0.0, bias, scale)
        return attn.proj_drop(attn.proj(x.view(queries.shape[0], queries.shape[1], -1)))

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
        """(q, k, SDPA's scale): v1's scaled dot product."""
        return q, k, None

    def _bias(self, place: WindowRows, batch: int, hw, window, dtype) -> torch.Tensor:
        """The relative positions at each slot's query centre plus the block's mask of the
        shifted window's sub-windows: [B·nW, heads, Wh·Ww, Wh·Ww]."""
        bias = half_step_bias(self.half_step_table().to(dtype), place.centers, window)
        mask = self._mask(hw, window, bias)
        if mask is None:
            return bias
        n = bias.shape[-1]
        return (bias.view(batch, -1, bias.shape[1], n, n) + mask.to(dtype)[None, :, None]).view(bias.shape)

    def _mask(self, hw, window, like: torch.Tensor) -> Optional[torch.Tensor]:
        """The vanilla block's [nW, Wh·Ww, Wh·Ww] mask of this map (None: no shift)."""
        block = self.original
        if not getattr(block, "dynamic_mask", False):
            return block.attn_mask
        padded = [-(-s // w) * w for s, w in zip(hw, window)]
        return block.get_attn_mask(like.new_empty(1, padded[0], padded[1], 0))

    def half_step_table(self) -> torch.Tensor:
        """[heads, 4Wh - 3, 4Ww - 3]: the learned table upsampled to half-token steps (bilinear,
        corners aligned: whole offsets keep their entries, half ones average two)."""
        (wh, ww), attn = self.original.window_size, self.attn
        table = attn.relative_position_bias_table.view(2 * wh - 1, 2 * ww - 1, -1).permute(2, 0, 1)
        return F.interpolate(table[None], size=(4 * wh - 3, 4 * ww - 3), mode="bilinear", align_corners=True)[0]

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        """``windowed_attention_cost``, and the half-step table: its bilinear upsampling (fvcore:
        4 per value) in the DGE form only."""
        (wh, ww), heads = self.original.window_size, self.attn.num_heads
        cost = windowed_attention_cost(self, hw, (wh, ww))
        table = 4.0 * (4 * wh - 3) * (4 * ww - 3) * heads
        return BlockCost(cost.fixed + table, cost.per_query, cost.vanilla_delta - table)


@register_adapter
class SwinV2Adapter(SwinAdapter):
    block_type = swin2.SwinTransformerV2Block
    attention_type = swin2.WindowAttention
    family = "timm's Swin v2 block (SwinTransformerV2Block)"

    def forward_queries(self, queries, context, hw, query_centers=None, rows=None) -> torch.Tensor:
        """Post-norm: ``x + norm1(attn(x))``, then ``x + norm2(mlp(x))``; the context is not normed."""
        attn = self.norm1(self._attention(queries, context, hw, query_centers, rows))
        x = queries + drop_path_rows(self.drop_path1, attn, rows)
        return x + drop_path_rows(self.drop_path2, self.norm2(self.mlp(x)), rows)

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[float]]:
        """Cosine attention: unit q and k per head, q times the head's clamped logit scale."""
        attn, heads = self.attn, self.attn.num_heads
        scale = torch.clamp(attn.logit_scale, max=math.log(1.0 / 0.01)).exp().view(heads, 1)
        q = (F.normalize(q.view(q.shape[0], heads, -1), dim=-1) * scale).view(q.shape)
        k = F.normalize(k.view(*k.shape[:-1], heads, -1), dim=-1).view(k.shape)
        return q, k, 1.0

    def half_step_table(self) -> torch.Tensor:
        """[heads, 4Wh - 3, 4Ww - 3]: 16 sigmoid(the position MLP) at half-token steps, on timm's
        log-spaced coordinates (whole steps give timm's own table)."""
        attn = self.attn
        coords = self.half_step_coords(attn.relative_coords_table.device)
        bias = attn.cpb_mlp(coords.to(attn.relative_coords_table.dtype))[0]
        return (16 * torch.sigmoid(bias)).permute(2, 0, 1)

    def half_step_coords(self, device) -> torch.Tensor:
        """[1, 4Wh - 3, 4Ww - 3, 2]: timm's ``relative_coords_table`` at half steps."""
        attn, axes = self.attn, []
        for w, pretrained in zip(attn.window_size, attn.pretrained_window_size):
            steps = torch.arange(-2 * (w - 1), 2 * (w - 1) + 1, device=device, dtype=torch.float32) / 2
            axes.append(steps / max((pretrained if pretrained > 0 else w) - 1, 1))
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None] * 8
        return torch.sign(coords) * torch.log2(torch.abs(coords) + 1.0) / math.log2(8)

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        """As v1's, post-norm (``norm1`` per query only), with the position MLP: on
        (2Wh - 1)(2Ww - 1) offsets in the vanilla block, on the half-step grid here."""
        (wh, ww), mlp = self.attn.window_size, linear_cost(self.attn.cpb_mlp)
        cost = windowed_attention_cost(self, hw, (wh, ww), pre_norm=False)
        vanilla, dge = (2 * wh - 1) * (2 * ww - 1) * mlp, (4 * wh - 3) * (4 * ww - 3) * mlp
        return BlockCost(cost.fixed + dge, cost.per_query, cost.vanilla_delta + vanilla - dge)
