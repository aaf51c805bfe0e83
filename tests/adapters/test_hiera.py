"""Hiera and SAM 2's HieraDet under DGE (``dge.adapters.hiera``): the blocks that pool queries
between stages stay dense; Hiera's tokens go to raster order and back as the model's own
``reroll`` orders them; SAM 2's windows of 8, 4, 14 and 7 take what tiles them; windowed
blocks against a slow loop over queries and keys on random routing (Hiera's mask units are
the same windows once its tokens are in raster order)."""
import logging

import pytest
import timm
import torch
from timm.models import hieradet_sam2
from torch.nn import functional as F

import dge
from dge.adapters.hiera import HieraAdapter, HieraDetAdapter
from model_helpers import TimmCase, max_diff, reference_dge

HIERA = TimmCase("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1), img_size=(128, 128)),
                 (128, 128))


def test_stage_transitions_stay_dense_and_the_log_says_so(caplog):
    model, _ = HIERA.build()
    with caplog.at_level(logging.INFO, logger="dge"):
        dge.patch(model)
    wrapped = [i for i, b in enumerate(model.blocks) if isinstance(b, dge.DynamicGrainedEncoder)]
    assert wrapped == [0, 2, 4]  # blocks 1, 3, 5 pool their queries (stride 2, wider output)
    assert "3 blocks of Hiera wrapped (3 kept dense)" in caplog.text


def test_hiera_tokens_go_to_raster_order_and_back():
    """The adapter's order is the model's: rerolled block outputs are maps in raster order."""
    model, _ = HIERA.build()
    dge.patch(model)
    for i in (0, 2, 4):
        adapter = model.blocks[i].block
        assert isinstance(adapter, HieraAdapter)
        n, c = len(adapter.raster), 3
        unrolled = torch.randn(2, n, c)
        call = adapter.prepare(unrolled)
        assert torch.equal(call.tokens.view(2, *adapter.hw, c), model.reroll(unrolled, i))
        assert torch.equal(call.restore(call.tokens), unrolled)


def test_sam2_windows_take_what_tiles_them():
    """sam2_hiera_tiny's windows (8, 4, 14, 7) and global blocks: Φ = {1, 2, 4} is refused with the
    way out; fitted, windows of 14 take {1, 2}, windows of 7 stay dense."""
    model = timm.create_model("sam2_hiera_tiny", embed_dim=32, num_heads=1)
    with pytest.raises(ValueError, match=r"window 14x14.*fit_to_windows"):
        dge.patch(model)
    pooling = [i for i, b in enumerate(model.blocks) if HieraDetAdapter.dense(b)]
    dge.patch(model, dge.adapters.fit_to_windows())
    phi = {}
    for i, block in enumerate(model.blocks):
        if i not in pooling:
            wrapped = isinstance(block, dge.DynamicGrainedEncoder)
            window = HieraDetAdapter.window(block.block.original if wrapped else block)
            phi.setdefault(window, set()).add(block.granularities if wrapped else "dense")
    assert all(not isinstance(model.blocks[i], dge.DynamicGrainedEncoder) for i in pooling)
    assert phi == {(8, 8): {(1, 2, 4)}, (4, 4): {(1, 2, 4)}, (14, 14): {(1, 2)}, None: {(1, 2, 4)}, (7, 7): {"dense"}}


class SlowWindows:
    """forward_queries of a SAM 2 block, one query and one head at a time against its window of
    the normed map zero-padded to whole windows (the padding enters the keys as zeros)."""

    def __init__(self, block, hw):
        self.block, self.hw, self.window = block, hw, tuple(block.window_size)

    def attention(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        attn = self.block.attn
        heads, dim = attn.num_heads, query.shape[-1]
        d = dim // heads
        q = F.linear(query, attn.qkv.weight[:dim], attn.qkv.bias[:dim])
        k = F.linear(keys, attn.qkv.weight[dim:2 * dim], attn.qkv.bias[dim:2 * dim])
        v = F.linear(keys, attn.qkv.weight[2 * dim:], attn.qkv.bias[2 * dim:])
        out = [(k[:, h * d:(h + 1) * d] @ q[h * d:(h + 1) * d] * d ** -0.5).softmax(0) @ v[:, h * d:(h + 1) * d]
               for h in range(heads)]
        return attn.proj(torch.cat(out))

    def forward_queries(self, queries, context, hw, centers, rows=None):
        b, (wh, ww), (h, w) = self.block, self.window, self.hw
        grid = F.pad(b.norm1(context[0]).view(h, w, -1), (0, 0, 0, -w % ww, 0, -h % wh))
        out = []
        for query, (cy, cx) in zip(queries[0], centers[0].tolist()):
            oy, ox = int(cy // wh) * wh, int(cx // ww) * ww
            x = query + b.ls1(self.attention(b.norm1(query), grid[oy:oy + wh, ox:ox + ww].reshape(wh * ww, -1)))
            out.append(x + b.ls2(b.mlp(b.norm2(x))))
        return torch.stack(out)[None]


@pytest.mark.parametrize("window, phi", [(4, (1, 2, 4)), (6, (1, 2))])
def test_sam2_windows_equal_a_slow_loop_over_queries_and_keys(window, phi):
    """An 11×13 map (windows padded; regions cut at the border), random routing, batch 2: the
    DGE block against the loop."""
    hw, dim = (11, 13), 32
    torch.manual_seed(0)
    block = hieradet_sam2.MultiScaleBlock(dim, dim, num_heads=2, window_size=window, init_values=0.5).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.15)
    layer = dge.DynamicGrainedEncoder(HieraDetAdapter(block), dim, dict(granularities=phi, region_size=max(phi))).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *hw, dim, generator=gen)
    grid = (-(-hw[0] // max(phi)), -(-hw[1] // max(phi)))
    gmap = torch.tensor(phi)[torch.randint(0, len(phi), (2, *grid), generator=gen)]
    with torch.no_grad():
        out = layer(x, granularity_map=gmap)
        reference = reference_dge(SlowWindows(block, hw), x.flatten(1, 2), hw, gmap, region=max(phi)).view(x.shape)
        assert max_diff(out, reference) <= 1e-5
        assert max_diff(layer(x, granularity_map=torch.ones_like(gmap)), block(x)) <= 1e-5  # all-fine: the block
