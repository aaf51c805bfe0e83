"""timm's ``EvaBlock`` with ``EvaAttention``: EVA, EVA-02 (fused qkv with q / v biases or
separate projections, gamma layer scales, SwiGLU, rotary position embeddings).

Keys are rotated as timm rotates them. A pooled query sits at its region's centre, between
tokens: it is rotated by the table's angle there (``rope_at_centers``), read off the table as
the angle of the token below plus the fraction times each channel's one-token step. That is
exact while a channel turns by less than π per token; EVA rescales its table to the
pre-training grid, so small grids turn faster, and the stage's grid refuses them
(``RopeStepCheck``) with the least size that works.
"""
import functools
import math
from typing import Optional, Tuple

import torch
from timm.layers import RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models.eva import EvaAttention, EvaBlock
from torch import nn

from dge.layers import BlockCall, BlockCost, DGEOptions
from dge.layers.kernels import attend

from .base import Stage, TimmAdapter, global_attention_cost, project_qkv, refuse_mask, register_adapter, split_heads

__all__ = ["EvaAdapter", "RopeStepCheck", "rope_at_centers"]


@register_adapter
class EvaAdapter(TimmAdapter):
    block_type = EvaBlock
    attention_type = EvaAttention
    family = "timm's EvaBlock with EvaAttention (EVA, EVA-02)"

    def __init__(self, block: nn.Module, stage: Optional[Stage] = None):
        super().__init__(block, stage)
        rope = getattr(getattr(stage, "model", None), "rope", None)
        if rope is not None:  # once per forward, at the patch embedding, not in every block
            stage.grid.checks.setdefault("rope", RopeStepCheck(rope))

    @classmethod
    def check(cls, block: nn.Module, label: str, stage: Stage, options: DGEOptions) -> None:
        rope = getattr(stage.model, "rope", None)
        if rope is not None and (type(rope) is not RotaryEmbeddingCat or rope.grid_type != "index"):
            raise TypeError(
                f"dge.patch supports EVA's rotary embedding on an index grid; {type(stage.model).__name__} has "
                f"{type(rope).__name__} (grid {getattr(rope, 'grid_type', None)})"
            )

    def prepare(self, x: torch.Tensor, hw=None, rope=None, attn_mask=None, is_causal: bool = False) -> BlockCall:
        """EVA's ``blk(x, rope=table)``: the table is bound to this call's ``forward_queries``."""
        refuse_mask(attn_mask, is_causal)
        run = self.forward_queries if rope is None else functools.partial(self.forward_queries, rope=rope)
        return BlockCall(x, tuple(hw) if hw is not None else self.grid.read(), run)

    def _attention(self, queries, context, hw, centers, rows, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q projected from the queries, k and v from the context; keys rotated by the
        table ``rope``, queries by the table at their centres (prefix tokens unrotated, as
        timm; the grid checked the step against the table when it was recorded)."""
        attn = self.attn
        q, k, v = split_heads(attn, *project_qkv(attn, queries, context))
        if rope is not None:
            half, e = attn.rotate_half, attn.num_prefix_tokens
            k = torch.cat([k[:, :, :e], apply_rot_embed_cat(k[:, :, e:], rope, half=half)], dim=2).type_as(v)
            q = apply_rot_embed_cat(q, rope_at_centers(rope, hw, centers)[:, None], half=half).type_as(v)
        x = attend(q, k, v, rows, attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(attn.norm(x)))

    def layer_scale(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """EVA's ``gamma_{i}`` parameter (unset without layer scale)."""
        gamma = getattr(self, f"gamma_{i}", None)
        return x if gamma is None else gamma * x

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        return global_attention_cost(self, hw, num_extra)


class RopeStepCheck:
    """A check of a token grid for a rotary embedding (host numbers, read once from its
    bands and pre-training grid ``ref_feat_shape``): pooled queries take the angle between
    tokens, exact while a channel turns by less than π per token at the rescaled grid."""

    def __init__(self, rope: nn.Module):
        self.band, self.ref = float(rope.bands.abs().max()), rope.ref_feat_shape

    def __call__(self, hw: Tuple[int, int]) -> None:
        grid = self.ref or hw  # without a pre-training grid the step is the band itself
        scale = max(r / s for r, s in zip(grid, hw))
        if self.band * scale >= math.pi:
            least = math.ceil(self.band * max(grid) / math.pi + 1e-9)
            raise ValueError(
                f"a {hw[0]}x{hw[1]} patch grid turns the rotary embedding by {self.band * scale:.2f} rad a "
                f"token (≥ π) at its pre-training grid {tuple(grid)}: DGE's pooled queries need at least "
                f"{least} patches a side"
            )


def rope_at_centers(table: torch.Tensor, hw: Tuple[int, int], centers: torch.Tensor) -> torch.Tensor:
    """timm's concatenated rotary table [H*W, 2D] (sin | cos) evaluated at query centres
    [B, M, 2] (y, x; token (i, j) centred at (i + 0.5, j + 0.5); extra tokens at 0, which
    get the identity rotation) -> [B, M, 2D] float32.

    Each channel's angle is affine in the token index (timm's index, pixel and centred grids,
    EVA's rescaling), so the angle at a centre is the table's at the token below it plus the
    fraction times the channel's one-token step, read off the table (|step| < π: true of
    index-grid bands, whose step is at most the grid's rescale factor). Whole-token centres
    read the table exactly."""
    if table.dim() != 2 or table.shape[0] != hw[0] * hw[1]:
        raise ValueError(
            f"dge needs a rotary table [H*W = {hw[0] * hw[1]}, 2D] (timm's 'cat' rope); got {tuple(table.shape)}"
        )
    sin, cos = table.float().view(hw[0], hw[1], -1).chunk(2, dim=-1)
    pos = centers - 0.5
    below = pos.floor().clamp(min=0)
    frac = pos - below
    index = below[..., 0].clamp(max=hw[0] - 1).long() * hw[1] + below[..., 1].clamp(max=hw[1] - 1).long()
    s, c = (t.reshape(hw[0] * hw[1], -1)[index] for t in (sin, cos))
    phi = frac[..., :1] * _step_angle(sin, cos, 0) + frac[..., 1:] * _step_angle(sin, cos, 1)
    sp, cp = phi.sin(), phi.cos()
    s, c = s * cp + c * sp, c * cp - s * sp
    prefix = centers[..., :1] < 0.5
    return torch.cat([s.masked_fill(prefix, 0.0), c.masked_fill(prefix, 1.0)], dim=-1)


def _step_angle(sin: torch.Tensor, cos: torch.Tensor, dim: int) -> torch.Tensor:
    """[D] each channel's angle step from token 0 to token 1 along ``dim`` of [H, W, D]
    tables, in (-π, π] (0 for a grid one token wide)."""
    if sin.shape[dim] < 2:
        return sin.new_zeros(sin.shape[-1])
    s0, s1 = sin.select(dim, 0)[0], sin.select(dim, 1)[0]
    c0, c1 = cos.select(dim, 0)[0], cos.select(dim, 1)[0]
    return torch.atan2(s1 * c0 - c1 * s0, c1 * c0 + s1 * s0)
