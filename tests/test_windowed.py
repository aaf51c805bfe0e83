"""Windowed attention under DGE (SAM's / ViTDet's blocks through dge.patch): each pooled
query attends to its window's dense keys with the decomposed relative-position bias at its
centre, checked against a slow loop over queries, keys and windows (odd map sizes, padded
windows, global blocks); all-fine routing is the untouched model."""
import math

import pytest
import timm
import torch
from timm.models import vision_transformer_sam as sam
from torch.nn import functional as F

import dge
from dge.analysis.calibration import calibrate, randomize_routers, set_logit_offset
from dge.analysis.syncs import count_host_reads
from dge.export import ExportedModel, RoutedOutputs, export_module, max_difference
from dge.layers import DynamicGrainedEncoder
from dge.modeling.timm_patch import TimmBlock, TokenGrid
from model_helpers import PATCHED_MODELS, recorded, reference_dge, routed_patched_model

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
    grid = TokenGrid()
    layer = DynamicGrainedEncoder(TimmBlock(block, grid), DIM).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, hw[0] * hw[1], DIM, generator=gen)
    gmap = torch.tensor([1, 2, 4])[torch.randint(0, 3, (2, 3, 4), generator=gen)]
    with torch.no_grad():
        reference = reference_dge(SlowWindowed(block), x, hw, gmap, region=4)
        assert float((layer(x, hw, gmap) - reference).abs().max()) <= 1e-5
        maps = layer(x.view(2, *hw, DIM), granularity_map=gmap)  # SAM's [B, H, W, C] call
        assert float((maps.flatten(1, 2) - reference).abs().max()) <= 1e-5


def small_sam():
    """A SAM ViT: 11×15 patches, windows of 4 (padded to 12×16), block 1 global; (model, x)."""
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", img_size=(176, 240), window_size=4, depth=3,
                              global_attn_indexes=[1], embed_dim=64, num_heads=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.normal_(0.0, 0.5)
    return model, torch.randn(2, 3, 176, 240)


def test_patched_sam_vit_at_all_fine_routing_is_the_untouched_model():
    """A SAM ViT patched: all-fine routing is the untouched model; each block's (fixed,
    per-query) cost is fvcore's count of the vanilla block; β reaches its target."""
    model, x = small_sam()
    with torch.no_grad():
        reference = model.forward_features(x)
        vanilla = [dge.FlopCountAnalysis(model.blocks[i], (torch.randn(1, 11, 15, 64),)).total() for i in range(3)]
        dge.patch(model)
        set_logit_offset(model, [30.0])
        assert float((model.forward_features(x) - reference).abs().max()) <= 1e-5
    for i, flops in enumerate(vanilla):
        fixed, per_query = model.blocks[i].block.complexity((11, 15))
        assert fixed + per_query * 165 == pytest.approx(flops, rel=0.01)
    randomize_routers(model)
    with torch.no_grad():
        calibrate(model, lambda: model(x), 0.5, steps=10)
        _, record = recorded(model.forward_features, x[:1])
    beta = dge.complexity_report(record, model).beta
    assert float(beta) == pytest.approx(0.5, abs=0.1)


def test_patch_refuses_regions_that_cross_windows():
    model = timm.create_model("samvit_base_patch16", img_size=(112, 112), window_size=6, depth=2,
                              global_attn_indexes=[1], embed_dim=64, num_heads=2)
    with pytest.raises(ValueError, match="region size 4 .* window size 6"):
        dge.patch(model)


def test_patched_sam_reads_one_nonzero_per_block_and_exports_dynamic():
    model, x = small_sam()
    dge.patch(model)
    randomize_routers(model)
    with torch.no_grad():
        calibrate(model, lambda: model(x), 0.5, steps=10)
        assert count_host_reads(lambda: model(x)) == {"aten::nonzero": len(model.blocks)}
        program = torch.export.export(model, (x[:1],))
        for image in (x[:1], x[1:]):
            assert float((program.module()(image) - model(image)).abs().max()) <= 1e-5
        _, first = recorded(model, x[:1])
        _, second = recorded(model, x[1:])
    assert not torch.equal(first.infos[0].granularity_map, second.infos[0].granularity_map)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", sorted(PATCHED_MODELS))
def test_patched_models_export_to_onnx_and_torchscript_and_stay_dynamic(tmp_path, case, fmt):
    """Exported at one image's routing, each file runs another image's routing as eager does
    (onnxruntime for ONNX), β included."""
    model, x = routed_patched_model(case, batch=2)
    with torch.no_grad():
        wrapped = RoutedOutputs(model)
        export_module(wrapped, x[:1], str(tmp_path / f"model.{fmt}"), fmt)
        exported = ExportedModel(str(tmp_path / f"model.{fmt}"))
        outputs = [(exported(image), wrapped(image)) for image in (x[:1], x[1:])]
    assert all(max_difference(a, b) <= 1e-5 for a, b in outputs)
    assert not torch.equal(outputs[0][1]["dge.beta"], outputs[1][1]["dge.beta"])
