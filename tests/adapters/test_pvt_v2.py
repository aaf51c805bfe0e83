"""PVT v2 under DGE (``dge.adapters.pvt_v2``): the depthwise-conv MLP as documented, against a
loop that writes each query's hidden row onto its patch's tokens, convolves the map and reads
each query back as its patch's mean (random routing with skipped regions, an odd map, SR and
linear attention); its cost, the conv counted as fixed work."""
import pytest
import torch
from timm.models import pvt_v2

from dge.adapters.pvt_v2 import PvtV2Adapter
from dge.analysis.flop_count import FlopCountAnalysis
from dge.layers import DynamicGrainedEncoder
from model_helpers import max_diff

DIM, HW = 32, (11, 13)


def pvt_v2_block(linear: bool, seed: int = 0):
    torch.manual_seed(seed)
    block = pvt_v2.Block(DIM, num_heads=2, mlp_ratio=2.0, sr_ratio=2, linear_attn=linear, qkv_bias=True)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.2)
    return block.eval()


def patches(gmap, region):
    """(queries as lists of member tokens (i, j)) of one image's map, region by region."""
    members = []
    for ri in range(gmap.shape[0]):
        for rj in range(gmap.shape[1]):
            g = int(gmap[ri, rj])
            for py in range(ri * region, (ri + 1) * region, g or region):
                for px in range(rj * region, (rj + 1) * region, g or region):
                    toks = [(i, j) for i in range(py, min(py + g, HW[0])) for j in range(px, min(px + g, HW[1]))]
                    if g and toks:
                        members.append(toks)
    return members


def slow_pvt_v2(adapter, x, gmap, region):
    """The DGE output of one image: attention as the adapter computes it for the pooled
    queries; the MLP by hand: fc1 on the queries, their rows on their tokens (0 where skipped),
    the depthwise conv, each query the mean of its tokens, then the activation and fc2."""
    block, mlp, (h, w) = adapter.original, adapter.mlp, HW
    members = patches(gmap, region)
    index = [[i * w + j for i, j in toks] for toks in members]
    q = torch.stack([x[0, toks].mean(0) for toks in index])[None]
    a = q + adapter._attention(block.norm1(q), block.norm1(x), HW, None)
    hidden = mlp.relu(mlp.fc1(block.norm2(a)))[0]
    dense = torch.zeros(h * w, hidden.shape[-1])
    for k, toks in enumerate(index):
        dense[toks] = hidden[k]
    conv = mlp.dwconv(dense.t().reshape(1, -1, h, w))[0].flatten(1).t()
    back = torch.stack([conv[toks].mean(0) for toks in index])
    y = a[0] + mlp.fc2(mlp.act(back))
    out = x[0].clone()
    for k, toks in enumerate(index):
        out[toks] = x[0, toks] + (y[k] - q[0, k])
    return out


@pytest.mark.parametrize("linear", [False, True], ids=["sr", "linear"])
def test_the_depthwise_conv_runs_on_the_map_of_the_queries(linear):
    block = pvt_v2_block(linear)
    adapter = PvtV2Adapter(block)
    layer = DynamicGrainedEncoder(adapter, DIM, dict(granularities=(0, 1, 2, 4))).eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, HW[0] * HW[1], DIM, generator=gen)
    gmap = torch.tensor([0, 1, 2, 4])[torch.randint(0, 4, (2, 3, 4), generator=gen)]
    gmap[0, 0, 0], gmap[1, 1, 1] = 0, 2
    with torch.no_grad():
        out = layer(x, HW, gmap)
        for b in range(2):
            assert max_diff(out[b], slow_pvt_v2(adapter, x[b:b + 1], gmap[b], 4)) <= 1e-5
        assert max_diff(layer(x, HW, torch.ones_like(gmap)), block(x, HW)) <= 1e-5  # all-fine: the block


@pytest.mark.parametrize("linear", [False, True], ids=["sr", "linear"])
def test_the_cost_counts_the_conv_as_fixed_and_is_fvcores_count(linear):
    block = pvt_v2_block(linear)
    adapter = PvtV2Adapter(block)
    fixed, per_query, delta = adapter.complexity(HW)
    tokens = torch.randn(1, HW[0] * HW[1], DIM)
    vanilla = FlopCountAnalysis(block, (tokens, HW)).total()
    assert fixed + delta + per_query * tokens.shape[1] == pytest.approx(vanilla, rel=1e-6)
    assert fixed >= HW[0] * HW[1] * 9 * block.mlp.fc1.out_features  # the depthwise conv on the dense map
