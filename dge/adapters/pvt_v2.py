"""timm's PVT v2 blocks (``pvt_v2_b0``-``b5``, ``b2_li``): spatial-reduction attention (an R×R
conv of the context before keys and values) or linear attention (the context pooled to 7×7),
and an MLP with a 3×3 depthwise convolution between its two layers.

The convolution mixes neighbouring tokens, so it runs on the dense map: the first layer runs
on the queries, its rows go onto the map (each token takes its query's row: ``QueryMap``),
the convolution runs there, and each query reads back the mean of its patch; the activation
and the second layer run on the queries again. At all-fine routing this is the vanilla MLP.
The convolution is fixed work, counted in both of β's sums; the map round trip costs two
gathers and a pooling of the hidden rows (tools/benchmark.py measures it). The convolutions
(the MLP's and the spatial reduction) run on a channels-last view of the tokens, where timm
transposes them to NCHW: the same sums in another order (max |diff| about 1e-6).
"""
from typing import Tuple

import torch
from timm.models import pvt_v2

from dge.layers import BlockCall, BlockCost
from dge.layers.block import drop_path_rows
from dge.layers.kernels import attend

from .base import TimmAdapter, linear_cost, norm_cost, register_adapter

__all__ = ["PvtV2Adapter", "channels_last"]


def channels_last(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Tokens [B, H*W, C] as a [B, C, H, W] view in channels-last memory (no copy): the
    layout oneDNN convolves without reordering (timm's transpose to NCHW costs a copy each
    way)."""
    return tokens.reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1]).permute(0, 3, 1, 2)


@register_adapter
class PvtV2Adapter(TimmAdapter):
    block_type = pvt_v2.Block
    attention_type = pvt_v2.Attention
    family = "timm's PVT v2 block (spatial-reduction or linear attention, depthwise-conv MLP)"
    uses_query_map = True

    def prepare(self, x: torch.Tensor, hw=None) -> BlockCall:
        """PVT v2's ``blk(x, feat_size)``: tokens [B, H*W, C] and the map size."""
        if hw is None:
            raise TypeError("a PVT v2 block is called with its map size: blk(x, feat_size)")
        return BlockCall(x, tuple(hw), self.forward_queries)

    def forward_queries(self, queries, context, hw, query_centers=None, rows=None, query_map=None) -> torch.Tensor:
        q = self.norm1(queries)
        ctx = q if context is queries else self.norm1(context)
        x = queries + drop_path_rows(self.drop_path1, self._attention(q, ctx, hw, rows), rows)
        return x + drop_path_rows(self.drop_path2, self._mlp(self.norm2(x), hw, query_map), rows)

    def _attention(self, queries, context, hw, rows) -> torch.Tensor:
        """q from the queries; keys and values from the context, reduced as the vanilla block does."""
        attn = self.attn
        b, n, c = context.shape
        heads, d = attn.num_heads, attn.head_dim
        q = attn.q(queries)
        q = q.view(q.shape[0], q.shape[1], heads, d).transpose(1, 2)
        if attn.sr is not None:  # SR conv, or 7×7 pooling then a 1×1 conv (linear attention)
            grid = channels_last(context, hw)
            grid = attn.pool(grid) if attn.pool is not None else grid
            context = attn.norm(attn.sr(grid).reshape(b, c, -1).transpose(1, 2))
            context = attn.act(context) if attn.act is not None else context
        kv = attn.kv(context).reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
        x = attend(q, kv[0], kv[1], rows, attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(x))

    def _mlp(self, x: torch.Tensor, hw, query_map) -> torch.Tensor:
        """fc1 on the queries, the depthwise conv on the map, the activation and fc2 on the queries."""
        mlp = self.mlp
        hidden = mlp.relu(mlp.fc1(x))
        grid = query_map.to_map(hidden) if query_map is not None else hidden
        b, _, d = grid.shape
        grid = mlp.dwconv(channels_last(grid, hw)).permute(0, 2, 3, 1).reshape(b, -1, d)
        hidden = query_map.from_map(grid).view(hidden.shape) if query_map is not None else grid
        return mlp.drop(mlp.fc2(mlp.drop(mlp.act(hidden))))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        """Fixed: ``norm1`` of the context, its reduction (conv or pooling + 1×1 conv, norm) and
        the key / value projection, the depthwise conv on the map; per query: the rest. The
        vanilla block norms each token once (``vanilla_delta``)."""
        attn, mlp = self.attn, self.mlp
        n, c = hw[0] * hw[1], self.dim
        if attn.pool is not None:  # (fvcore counts the adaptive pooling as one op per input value)
            size = attn.pool.output_size
            keys = size * size if isinstance(size, int) else size[0] * size[1]
            reduce = n * c + keys * (c * c + norm_cost(attn.norm, c))
        elif attn.sr is not None:
            r = attn.sr.kernel_size[0]
            keys = (hw[0] // r) * (hw[1] // r)
            reduce = keys * (c * c * r * r + norm_cost(attn.norm, c))
        else:
            keys, reduce = n, 0.0
        hidden = mlp.fc1.out_features
        fixed = n * norm_cost(self.norm1, c) + reduce + keys * 2 * c * c + n * 9 * hidden
        per_query = norm_cost(self.norm1, c) + c * c + 2.0 * keys * c + linear_cost(attn.proj)
        per_query += norm_cost(self.norm2, c) + linear_cost(mlp.fc1) + linear_cost(mlp.fc2)
        return BlockCost(fixed, per_query, -n * norm_cost(self.norm1, c))
