"""SAM's / ViTDet's windowed blocks under DGE (``dge.adapters.sam``): each pooled query attends
to its window's dense keys with the decomposed relative-position bias at its centre, checked
against a slow loop over queries, keys and windows (odd map sizes, padded windows, global
blocks); regions that cross windows are refused."""
import math

import pytest
import timm
import torch
from timm.models import vision_transformer_sam as sam
from torch.nn import functional as F

import dge
from dge.layers import DynamicGrainedEncoder
from dge.adapters.sam import SamAdapter
from model_helpers import reference_dge

DIM, HEADS = 32, 2


def sam_block(window: int, hw, seed: int = 0) -> sam.Block:
    """A SAM block with random weights, relative-position tables and layer scales."""
    torch.manual_seed(seed)
    block = sam.Block(DIM, HEADS, mlp_ratio=2.0, use_rel_pos=True, window_size=window, input_size=hw, init_values=0.5)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.eval()


def lerp_row(table: torch.Tensor, position: float) -> torch.Tensor:
    """The table's row at a fractional position, linear between its neighbours."""
    low = math.floor(position)
    frac = position - low
    high = min(low + 1, table.shape[0] - 1)
    return table[low] * (1 - frac) + table[high] * frac


class SlowWindowed:
    """forward_queries of a SAM block, one query and one key at a time (the definition)."""

    def __init__(self, block: sam.Block):
        self.block = block

    def keys(self, context: torch.Tensor, hw):
        """The keys' normed tokens [kh, kw, C] of each window (global: the map) and its origin."""
        b, window = self.block, self.block.window_size
        grid = b.norm1(context[0]).view(hw[0], hw[1], -1)
        if window == 0:
            return lambda y, x: (grid, (0, 0))
        padded = F.pad(grid, (0, 0, 0, -hw[1] % window, 0, -hw[0] % window))  # zeros after the norm
        origin = lambda v: int(v // window) * window
        return lambda y, x: (padded[origin(y): origin(y) + window, origin(x): origin(x) + window],
                             (origin(y), origin(x)))

    def attention(self, query: torch.Tensor, tokens: torch.Tensor, center) -> torch.Tensor:
        attn, (kh, kw) = self.block.attn, tokens.shape[:2]
        d = attn.head_dim
        table_h = F.interpolate(attn.rel_pos_h.t()[None], size=2 * kh - 1, mode="linear")[0].t()
        table_w = F.interpolate(attn.rel_pos_w.t()[None], size=2 * kw - 1, mode="linear")[0].t()
        q = F.linear(query, attn.qkv.weight[:DIM], attn.qkv.bias[:DIM])
        kv = F.linear(tokens.reshape(kh * kw, -1), attn.qkv.weight[DIM:], attn.qkv.bias[DIM:])
        out = []
        for h in range(attn.num_heads):
            qh, kh_, vh = q[h * d: (h + 1) * d], kv[:, h * d: (h + 1) * d], kv[:, DIM + h * d: DIM + (h + 1) * d]
            logits = []
            for i in range(kh):
                for j in range(kw):
                    bias = qh @ lerp_row(table_h, center[0] - i + kh - 1)
                    bias = bias + qh @ lerp_row(table_w, center[1] - j + kw - 1)
                    logits.append(qh @ kh_[i * kw + j] * d ** -0.5 + bias)
            out.append(torch.stack(logits).softmax(0) @ vh)
        return attn.proj(torch.cat(out))

    def forward_queries(self, queries, context, hw, centers, rows=None):
        b, keys = self.block, self.keys(context, hw)
        out = []
        for query, (cy, cx) in zip(queries[0], centers[0].tolist()):
            tokens, (oy, ox) = keys(cy, cx)
            x = query + b.ls1(self.attention(b.norm1(query), tokens, (cy - 0.5 - oy, cx - 0.5 - ox)))
            out.append(x + b.ls2(b.mlp(b.norm2(x))))
        return torch.stack(out)[None]


@pytest.mark.parametrize("window", [4, 0], ids=["windowed", "global"])
def test_windowed_dge_equals_a_slow_loop_over_windows(window):
    """Random maps of Φ = {1, 2, 4} on an 11×15 map (windows of 4 padded to 12×16; regions
    of 4 cut at the border): batch 2 packed rows against one query at a time."""
    hw = (11, 15)
    block = sam_block(window, hw if window == 0 else (window, window))
    layer = DynamicGrainedEncoder(SamAdapter(block), DIM).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, hw[0] * hw[1], DIM, generator=gen)
    gmap = torch.tensor([1, 2, 4])[torch.randint(0, 3, (2, 3, 4), generator=gen)]
    with torch.no_grad():
        reference = reference_dge(SlowWindowed(block), x, hw, gmap, region=4)
        assert float((layer(x, hw, gmap) - reference).abs().max()) <= 1e-5
        maps = layer(x.view(2, *hw, DIM), granularity_map=gmap)  # SAM's [B, H, W, C] call
        assert float((maps.flatten(1, 2) - reference).abs().max()) <= 1e-5


def test_patch_refuses_regions_that_cross_windows():
    model = timm.create_model("samvit_base_patch16", img_size=(112, 112), window_size=6, depth=2,
                              global_attn_indexes=[1], embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="region size 4 does not divide block 0.s window 6x6"):
        dge.patch(model)
