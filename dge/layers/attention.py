"""Attention kinds of dge's vanilla encoder blocks, each attending from (sparse) queries to a
dense context: ``attn(queries [B, M, C], context [B, E+H*W, C], hw, query_centers [B, M, 2],
rows=None)``. With ``rows`` (a ``dge.layers.rows.QueryRows``) the queries of the B images
are packed rows [1, T, C] (centres [1, T, 2]). Global / SR attention pads only per segment of
one image's rows (with that image's keys); on a CUDA GPU in half precision it takes the packed
rows as they are (``dge.layers.kernels``). Deformable sampling reads every image's value map at
once, the maps side by side: no padding either. Positions (query centres, sampling locations)
are float32 in any activation dtype.

* ``SpatialReductionAttention`` ("sr"): PVT's attention (keys/values from an R×R strided conv
  of the context); ``sr_ratio=1`` is plain global attention (ViT / DeiT).
* ``DeformableAttention`` ("deformable"): single-scale deformable attention (DPVT): each query
  samples ``num_points`` values per head around its centre with ``F.grid_sample``.

Kinds are an open registry, as timm's ``create_attn``: ``register_attention(name)`` adds one,
``create_attention(name, dim, num_heads, **kwargs)`` builds one. Each reports its cost as
``complexity(hw, num_extra) -> (fixed, per_query)`` multiply-adds: the context side (keys,
values) is fixed, the query side grows with the number of queries.
"""
import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .kernels import attend, inference_tiles
from .rows import QueryRows, row_images

# The official models' defaults (PVT v1, DPVT, DeiT), stated once here and in block.py.
QKV_BIAS = True  # bias on the q / kv (qkv) projections: qkv_bias=True in every official model
SR_NORM_EPS = 1e-5  # PVT v1's nn.LayerNorm(dim) after the reduction conv: torch's default eps

__all__ = [
    "ATTENTION_KINDS",
    "QKV_BIAS",
    "SR_NORM_EPS",
    "SpatialReductionAttention",
    "DeformableAttention",
    "create_attention",
    "register_attention",
    "scale_grad",
]

def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by ``scale`` backward (no arithmetic when no
    gradient flows, e.g. at inference)."""
    if scale == 1.0 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return x.detach() + (x - x.detach()) * scale  # forward: exactly x


class MultiHeadBase(nn.Module):
    """dim C split into ``num_heads`` heads of ``head_dim`` channels."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads must divide dim {dim}; got {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads


class SpatialReductionAttention(MultiHeadBase):
    """Multi-head attention with spatially reduced keys/values (PVT v1).

    Args:
        dim: channels C.
        num_heads: heads; must divide ``dim``.
        qkv_bias: bias of the q and kv projections.
        sr_ratio: R; keys/values come from an R×R stride-R conv + LayerNorm of the context
            (R = 1: no reduction, global attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = QKV_BIAS,
        sr_ratio: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = SR_NORM_EPS,
    ):
        super().__init__(dim, num_heads)
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def num_keys(self, hw: Tuple[int, int], num_extra: int = 0) -> int:
        h, w = hw
        if self.sr_ratio > 1:
            return num_extra + (h // self.sr_ratio) * (w // self.sr_ratio)
        return num_extra + h * w

    def keys_values(self, context: torch.Tensor, hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """context [B, E+H*W, C] -> keys, values [B, heads, Nk, head_dim]."""
        b, n, c = context.shape
        if self.sr_ratio > 1:
            h, w = hw
            extra, spatial = context[:, : n - h * w], context[:, n - h * w:]
            # A channels-last view: the conv reads the tokens in place (no transpose copy).
            spatial = spatial.reshape(b, h, w, c).permute(0, 3, 1, 2)
            spatial = self.sr(spatial).flatten(2).transpose(1, 2)
            context = self.norm(torch.cat([extra, spatial], dim=1) if extra.shape[1] else spatial)
        kv = self.kv(context).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
    ) -> torch.Tensor:
        k, v = self.keys_values(context, hw)
        q = self.q(queries)
        q = q.view(*q.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)
        x = attend(q, k, v, rows, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        c = self.dim
        h, w = hw
        nk = self.num_keys(hw, num_extra)
        fixed = 0.0
        if self.sr_ratio > 1:
            nr = nk - num_extra
            fixed += nr * c * c * self.sr_ratio**2  # sr conv
            fixed += 5.0 * nk * c  # its LayerNorm
        fixed += nk * c * 2 * c  # kv projection
        per_query = c * c  # q projection
        per_query += 2.0 * nk * c  # q·kᵀ and attn·v
        per_query += c * c  # output projection
        return fixed, per_query


class DeformableAttention(MultiHeadBase):
    """Single-scale deformable attention (DPVT), in pure PyTorch.

    Each query predicts, per head, ``num_points`` offsets (in tokens) from its centre and
    softmax weights; values are sampled bilinearly (zeros outside the map) and summed. As
    in vtpack's DPVT, sampling offsets start on a ring per head and their gradient is
    scaled by ``offset_grad_scale``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_points: int = 4,
        qkv_bias: bool = QKV_BIAS,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        offset_grad_scale: float = 0.1,
    ):
        super().__init__(dim, num_heads)
        self.num_points = num_points
        self.offset_grad_scale = offset_grad_scale
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_weight = nn.Linear(dim, num_heads * num_points)
        self.offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._reset_offsets()

    def _reset_offsets(self) -> None:
        nn.init.zeros_(self.offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        ring = torch.stack([theta.cos(), theta.sin()], dim=-1)  # (x, y) per head
        ring = ring / ring.abs().max(dim=-1, keepdim=True)[0]
        ring = ring[:, None, :] * torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
        with torch.no_grad():
            self.offsets.bias.copy_(ring.reshape(-1))

    def forward(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
    ) -> torch.Tensor:
        """query_centers: [B, M, 2] (y, x) in token units (token (i, j) is centred at
        (i + 0.5, j + 0.5)); required."""
        if query_centers is None:
            raise ValueError("DeformableAttention needs query_centers [B, M, 2]")
        shape = queries.shape
        heads, points = self.num_heads, self.num_points
        b = context.shape[0]
        value = self._value_maps(context, hw)  # [heads, d, H, width]: the B maps side by side
        # Positions stay (at least) float32 in any activation dtype: bfloat16 is 2 tokens apart at 320.
        position = torch.promote_types(value.dtype, torch.float32)
        flat = queries.reshape(-1, self.dim)  # one row per query: B·M, or T packed rows
        offsets = self.offsets(flat).view(-1, heads, points, 2).to(position)  # (x, y) in tokens
        weights = self.attn_drop(self.attn_weight(flat).view(-1, heads, points).softmax(dim=-1))
        center_xy = query_centers.reshape(-1, 2).to(position).flip(-1)[:, None, None, :]
        loc = scale_grad(center_xy + offsets, self.offset_grad_scale)
        images = None if b == 1 else (rows.image_index if rows is not None else row_images(b, shape[1], flat.device))
        grid = self._grid(loc, images, hw, b)
        out_dtype = None
        if value.dtype != position:  # half precision: sample in float32 (weights too), return in value's dtype
            value, weights, out_dtype = value.to(position), weights.to(position), value.dtype
        x = self._sample(value, grid, weights.permute(1, 0, 2).unsqueeze(1))  # [heads, d, rows]
        x = x.permute(2, 0, 1).reshape(shape)
        if out_dtype is not None:
            x = x.to(out_dtype)
        return self.proj_drop(self.proj(x))

    def _value_maps(self, context: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """The values of the B images' spatial tokens as one map [heads, d, H, width], a
        channels-last view (bilinear taps read d adjacent values): for B > 1 the maps side by
        side, each followed by GAP zero columns (width = B(W + GAP)), so that one
        ``grid_sample`` serves every image without padding any image's queries."""
        h, w = hw
        b = context.shape[0]
        value = self.v(context[:, context.shape[1] - h * w:]).view(b, h, w, self.num_heads, self.head_dim)
        if b == 1:
            return value[0].permute(2, 3, 0, 1)
        value = F.pad(value.permute(3, 1, 0, 2, 4), (0, 0, 0, self.GAP))  # [heads, H, B, W + GAP, d]
        return value.reshape(self.num_heads, h, b * (w + self.GAP), self.head_dim).permute(0, 3, 1, 2)

    GAP = 2  # zero columns after each image's map: sampling beyond its border reads zeros

    def _grid(self, loc: torch.Tensor, images: Optional[torch.Tensor], hw: Tuple[int, int], b: int) -> torch.Tensor:
        """Sampling locations loc [rows, heads, P, 2] (x, y) in tokens of each row's image ->
        grid [heads, rows, P, 2] in [-1, 1] of the side-by-side map (``grid_sample``,
        align_corners=False: 2 · xy / wh - 1). Beyond an image's left / right border x is
        clamped to 1 token outside it, where both bilinear taps are zero columns: the value
        and the gradient are 0 there as with zero padding, and no tap reaches another image."""
        h, w = hw
        x, y = loc.unbind(-1)
        width = w
        if images is not None:
            x = x.clamp(-1.0, w + 1.0) + (images * (w + self.GAP)).to(x.dtype)[:, None, None]
            width = b * (w + self.GAP)
        return torch.stack([x * (2.0 / width) - 1.0, y * (2.0 / h) - 1.0], dim=-1).transpose(0, 1)

    def _sample(self, value: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_p weights · bilinear(value, grid): value [heads, d, H, W], grid [heads, M, P, 2],
        weights [heads, 1, M, P] -> [heads, d, M]. At inference in tiles of queries (the
        [heads, d, M, P] samples of a PVT-S stage-1 map are 66 MB; a tile's are 4 MB)."""
        heads, d, m, points = value.shape[0], value.shape[1], grid.shape[1], grid.shape[2]
        tile = inference_tiles(self, m, heads * d * points, value.device)
        if not tile:
            sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            return (sampled * weights).sum(dim=-1)
        out = value.new_empty(heads, d, m)
        for start in range(0, m, tile):  # tiles of queries, not regions or images
            part = F.grid_sample(
                value, grid[:, start : start + tile], mode="bilinear", padding_mode="zeros", align_corners=False
            )
            torch.sum(part.mul_(weights[:, :, start : start + tile]), dim=-1, out=out[:, :, start : start + tile])
        return out

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        c = self.dim
        h, w = hw
        hp = self.num_heads * self.num_points
        fixed = float(h * w * c * c)  # value projection
        per_query = c * hp * 3.0  # offsets (2 per point) and attention weights
        per_query += hp * self.head_dim * 4.0  # bilinear sampling: 4 taps per value
        per_query += hp * self.head_dim  # weighted sum over points
        per_query += c * c  # output projection
        return fixed, per_query


# ---------------------------------------------------------------------------- the registry
ATTENTION_KINDS: Dict[str, Callable[..., nn.Module]] = {}  # name -> factory(dim, num_heads, **kwargs)


def register_attention(name: str) -> Callable:
    """Decorator: ``factory(dim, num_heads, **kwargs) -> nn.Module`` becomes attention kind
    ``name`` (a factory takes the keywords it uses and ignores the rest)."""

    def register(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ATTENTION_KINDS[name] = factory
        return factory

    return register


def create_attention(kind: str, dim: int, num_heads: int, **kwargs) -> nn.Module:
    """The attention of kind ``kind`` (``ATTENTION_KINDS``) with ``dim`` channels."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {tuple(ATTENTION_KINDS)}; got {kind!r}")
    return ATTENTION_KINDS[kind](dim, num_heads, **kwargs)


@register_attention("sr")
def _sr(dim, num_heads, sr_ratio=1, qkv_bias=QKV_BIAS, attn_drop=0.0, proj_drop=0.0, **_) -> nn.Module:
    return SpatialReductionAttention(
        dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio, attn_drop=attn_drop, proj_drop=proj_drop
    )


@register_attention("deformable")
def _deformable(dim, num_heads, num_points=4, qkv_bias=QKV_BIAS, attn_drop=0.0, proj_drop=0.0, **_) -> nn.Module:
    return DeformableAttention(
        dim, num_heads, num_points=num_points, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
    )
