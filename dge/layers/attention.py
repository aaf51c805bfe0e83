"""Attention kinds of the vanilla encoder blocks, each attending from (sparse) queries to a
dense context: ``attn(queries [B, M, C], context [B, E+H*W, C], hw, query_centers [B, M, 2],
rows=None)``. With ``rows`` (a ``dge.layers.grained.QueryRows``) the queries of the B images
are packed rows [1, T, C] (centres [1, T, 2]); only the per-image part is padded: global /
SR attention per segment of one image's rows (with that image's keys), deformable sampling
per image (its small sampling grid only). On a CUDA GPU in half precision global / SR
attention takes the packed rows as they are (``varlen_attn``, no padding at all).
Positions (query centres, sampling locations) are float32 in any activation dtype.

* ``SpatialReductionAttention``: PVT's attention (keys/values from an R×R strided conv of
  the context); ``sr_ratio=1`` is plain global attention (ViT / DeiT).
* ``DeformableAttention``: single-scale deformable attention (DPVT): each query samples
  ``num_points`` values per head around its centre with ``F.grid_sample``.

Each reports its cost as ``complexity(hw, num_extra) -> (fixed, per_query)`` multiply-adds:
the context side (keys, values) is fixed, the query side grows with the number of queries.
"""
import functools
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .grained import QueryRows

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: segment padding everywhere
    varlen_attn = None

__all__ = [
    "SpatialReductionAttention",
    "DeformableAttention",
    "scale_grad",
    "inference_tiles",
    "packed_attention_available",
]


TILE_ELEMENTS = 1 << 20  # values per inference tile (4 MB in float32): fits the caches


def inference_tiles(module: nn.Module, rows: int, elements_per_row: int, device: torch.device) -> int:
    """Rows per tile when ``module`` should run ``rows`` rows in tiles of ``TILE_ELEMENTS``
    intermediate values, else 0. Tiles are used on the CPU at inference only (eval mode, no
    autograd, not traced), and only when there are more than two: a tile's intermediate then
    stays in cache instead of making a round trip through memory, and no huge buffer is
    allocated per call (glibc maps and zero-fills every allocation above 32 MB). A GPU runs
    the whole matrix in one kernel."""
    if device.type != "cpu" or module.training or torch.is_grad_enabled():
        return 0
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # a graph: no loop over a dynamic size
        return 0
    tile = max(1, TILE_ELEMENTS // max(1, elements_per_row))
    return tile if rows > 2 * tile else 0


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # flash attention: Ampere and newer


def packed_attention_available(q: torch.Tensor, head_dim: int, dropout: float) -> bool:
    """Whether attention over packed rows runs as ``varlen_attn`` (flash attention over
    variable-length sequences, torch >= 2.10): a CUDA device of compute capability 8.0 or
    newer, float16 / bfloat16 queries (e.g. under autocast), a head size that is a multiple
    of 8 up to 256, no attention dropout, and eager execution (``max_q`` is a host int).
    Elsewhere the rows are padded per segment (``QueryRows.segments``) for SDPA."""
    if varlen_attn is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or head_dim > 256 or dropout > 0.0:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return _flash_capable(q.device.index if q.device.index is not None else torch.cuda.current_device())


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
        qkv_bias: bool = False,
        sr_ratio: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-5,
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
        shape = queries.shape
        k, v = self.keys_values(context, hw)
        q = self.q(queries)
        segments = None
        drop = self.attn_drop if self.training else 0.0
        if rows is not None and packed_attention_available(q, self.head_dim, drop):
            return self.proj_drop(self.proj(self._varlen(q, k, v, rows).view(shape)))
        if rows is not None:  # pad per segment of one image's rows; each gets its image's keys
            segments, images = rows.segments()
            q = segments.pad(q.view(-1, self.dim))
            if images is not None:
                k, v = k.index_select(0, images), v.index_select(0, images)
        b, m, c = q.shape
        q = q.view(b, m, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        x = x.transpose(1, 2).reshape(b, m, c)
        if segments is not None:
            x = segments.unpad(x).view(shape)
        return self.proj_drop(self.proj(x))

    def _varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: QueryRows) -> torch.Tensor:
        """Packed rows q [1, T, C] of B images against each image's keys k, v [B, heads, Nk, d]
        in one flash-attention call over variable-length sequences: no padding, no mask."""
        b, heads, nk, d = k.shape
        k, v = (t.transpose(1, 2).reshape(b * nk, heads, d) for t in (k, v))
        cu_q = torch.cat([rows.counts.new_zeros(1), torch.cumsum(rows.counts, 0)]).to(torch.int32)
        cu_k = torch.arange(0, (b + 1) * nk, nk, device=k.device, dtype=torch.int32)
        x = varlen_attn(q.reshape(-1, heads, d), k, v, cu_q, cu_k, rows.max_rows, nk)
        return x.reshape(1, -1, self.dim)

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
        qkv_bias: bool = False,
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
        h, w = hw
        heads, points, d = self.num_heads, self.num_points, self.head_dim
        b = context.shape[0]
        spatial = context[:, context.shape[1] - h * w:]
        value = self.v(spatial).view(b, h, w, heads, d).permute(0, 3, 4, 1, 2).reshape(b * heads, d, h, w)
        # Positions stay (at least) float32 in any activation dtype: bfloat16 is 2 tokens apart at 320.
        position = torch.promote_types(value.dtype, torch.float32)
        offsets = self.offsets(queries).view(*shape[:2], heads, points, 2).to(position)  # (x, y) in tokens
        weights = self.attn_drop(self.attn_weight(queries).view(*shape[:2], heads, points).softmax(dim=-1))
        center_xy = query_centers.to(position).flip(-1)[:, :, None, None, :]
        loc = scale_grad(center_xy + offsets, self.offset_grad_scale)
        # Sampling locations in [-1, 1] (grid_sample, align_corners=False): 2 * xy / wh - 1.
        grid = loc * loc.new_tensor([2.0 / w, 2.0 / h]) - 1.0
        if value.dtype != position:  # half precision: sample in float32 (weights too), return in value's dtype
            value, weights, out_dtype = value.to(position), weights.to(position), value.dtype
        else:
            out_dtype = None
        if rows is not None:  # each image samples its own map: pad the (small) grid, not the queries
            grid, weights = rows.pad(grid.flatten(0, 1)), rows.pad(weights.flatten(0, 1))
        m = grid.shape[1]
        grid = grid.permute(0, 2, 1, 3, 4).reshape(b * heads, m, points, 2)
        weights = weights.permute(0, 2, 1, 3).reshape(b * heads, 1, m, points)
        x = self._sample(value, grid, weights).view(b, heads * d, m).transpose(1, 2)
        if out_dtype is not None:
            x = x.to(out_dtype)
        if rows is not None:
            x = rows.unpad(x)
        return self.proj_drop(self.proj(x.reshape(shape)))

    def _sample(self, value: torch.Tensor, grid: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_p weights · bilinear(value, grid): value [B*heads, d, H, W], grid [B*heads, M, P, 2],
        weights [B*heads, 1, M, P] -> [B*heads, d, M]. At inference in tiles of queries (the
        [B*heads, d, M, P] samples of a PVT-S stage-1 map are 66 MB; a tile's are 4 MB)."""
        bh, d, m, points = value.shape[0], value.shape[1], grid.shape[1], grid.shape[2]
        tile = inference_tiles(self, m, bh * d * points, value.device)
        if not tile:
            sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            return (sampled * weights).sum(dim=-1)
        out = value.new_empty(bh, d, m)
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
