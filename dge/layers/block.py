"""dge's vanilla encoder block (PVT, DPVT, DeiT), which satisfies the block protocol
(``dge.layers.protocol.DGEBlock``) natively.

``block(x [B, E + H*W, C], hw)`` is the block on every token, the call a vanilla and a DGE
block (``DynamicGrainedEncoder``) share, so a stage runs either the same way.
``block.forward_queries(queries, context, hw, query_centers, rows=None)`` is the block on
pooled queries against the dense context: packed as rows [1, T, C] of B images with
``rows`` (``dge.layers.rows.QueryRows``), row-wise work runs unpadded, only the attention
pads.
"""
from typing import Optional, Tuple

import torch
from timm.layers import DropPath
from timm.models import register_notrace_module
from torch import nn

from .kernels import inference_tiles
from .grained import token_centers
from .keys import map_block_keys
from .protocol import BlockCall
from .rows import QueryRows

__all__ = ["Mlp", "EncoderBlock", "NORM_EPS", "drop_path_rows"]

NORM_EPS = 1e-6  # the blocks' and the final norm: norm_layer=partial(nn.LayerNorm, eps=1e-6) in PVT v1 / DeiT


def drop_path_rows(drop_path: nn.Module, x: torch.Tensor, rows: Optional[QueryRows]) -> torch.Tensor:
    """``drop_path(x)`` (timm's ``DropPath`` or ``nn.Identity``), stochastic depth per image;
    for packed rows [1, T, C] every row of an image shares its image's draw."""
    rate = getattr(drop_path, "drop_prob", 0.0)
    if rows is None or not drop_path.training or rate == 0.0:
        return drop_path(x)
    keep = 1.0 - rate
    per_image = x.new_empty(rows.batch).bernoulli_(keep).div_(keep)
    return x * per_image.index_select(0, rows.image_index).view(x.shape[0], -1, 1)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. At CPU inference large inputs run in row tiles of 4 MB of hidden
    activation (``inference_tiles``): one reused tile buffer instead of a fresh [tokens,
    hidden] activation, which the allocator would map and zero-fill anew."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = inference_tiles(self, x.numel() // x.shape[-1], self.fc1.out_features, x.device)
        if rows:
            return self._forward_tiled(x, rows)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def _forward_tiled(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        n = flat.shape[0]
        out = flat.new_empty(n, self.fc2.out_features)
        buffer = flat.new_empty(rows, self.fc1.out_features)  # one hidden tile, reused
        gelu = type(self.act) is nn.GELU
        for start in range(0, n, rows):  # tiles of one matrix, not regions or images
            hidden = buffer[: min(rows, n - start)]
            torch.addmm(self.fc1.bias, flat[start : start + rows], self.fc1.weight.t(), out=hidden)
            hidden = torch.ops.aten.gelu_(hidden, approximate=self.act.approximate) if gelu else self.act(hidden)
            torch.addmm(self.fc2.bias, hidden, self.fc2.weight.t(), out=out[start : start + rows])
        return out.view(*x.shape[:-1], self.fc2.out_features)

    def complexity(self) -> float:
        """Multiply-adds per token."""
        return float(2 * self.fc1.in_features * self.fc1.out_features)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x), norm1(context))``, then
    ``x + mlp(norm2(x))``. ``attn`` is any attention of ``dge.layers.attention``.

    When ``context is queries`` (the vanilla call) ``norm1`` runs once.
    """

    block_keys = "vanilla"  # loads DGE checkpoints too: dge.layers.keys.map_block_keys

    def __init__(
        self,
        dim: int,
        attn: nn.Module,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        self.dim = dim
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """x: [B, E + H*W, C] (E extra tokens first) -> [B, E + H*W, C]: every token a query."""
        b, e = x.shape[0], x.shape[1] - hw[0] * hw[1]
        centers = token_centers(hw[0], hw[1], device=x.device).expand(b, -1, -1)  # float32 positions
        if e:
            centers = torch.cat([centers.new_zeros(b, e, 2), centers], dim=1)
        return self.forward_queries(x, x, hw, centers)

    def prepare(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> BlockCall:
        """The call ``block(x, hw)`` (``DGEBlock`` protocol): x is [B, E + H*W, C] already."""
        if hw is None:
            raise TypeError(f"{type(self).__name__} is called with the map size: block(x, hw)")
        return BlockCall(x, tuple(hw), self.forward_queries)

    def forward_queries(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
    ) -> torch.Tensor:
        q = self.norm1(queries)
        ctx = q if context is queries else self.norm1(context)
        x = queries + self._drop_path(self.attn(q, ctx, hw, query_centers, rows), rows)
        return x + self._drop_path(self.mlp(self.norm2(x)), rows)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        map_block_keys(state_dict, prefix, wrapped=False)  # a DGE checkpoint: keys with "block."
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _drop_path(self, x: torch.Tensor, rows: Optional[QueryRows]) -> torch.Tensor:
        return drop_path_rows(self.drop_path, x, rows)

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        """(fixed, per_query) multiply-adds, fvcore's convention (LayerNorm: 5 per element,
        softmax/GELU/additions: 0). Fixed: ``norm1`` of the context and the attention's
        key/value side; per query: everything else. (The vanilla call shares ``norm1`` of
        queries and context; counting it twice is off by < 0.2% of a block.)"""
        n = hw[0] * hw[1] + num_extra
        fixed, per_query = self.attn.complexity(hw, num_extra)
        norm = 5.0 * self.dim
        return fixed + norm * n, per_query + 2 * norm + self.mlp.complexity()


register_notrace_module(EncoderBlock)  # an FX leaf (timm's feature extraction), as DGE blocks are
