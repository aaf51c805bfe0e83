"""timm's ViT blocks under DGE (``dge.adapters.vit``): the adapter over timm's own modules gives
what dge's verified EncoderBlock gives; the variants of timm's Block (q / k norms, DeiT III's
layer scale, MAE's ViT-B) are the untouched model at all-fine routing and cost what fvcore
counts; timm's model contract (forward_intermediates, backward, FX) holds when patched."""
import pytest
import torch
from timm.models.vision_transformer import Block

import dge
from dge.adapters.vit import ViTAdapter
from dge.layers.calibration import calibrate, randomize_routers, set_logit_offset
from dge.analysis.flop_count import FlopCountAnalysis
from dge.layers import DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
from model_helpers import TimmCase, fx_extractor, max_diff, recorded

# 5×7 patches: regions of 4 cut at the borders
VARIANTS = {
    "qk_norm": TimmCase("vit_small_patch16_224", dict(img_size=(80, 112), depth=2, qk_norm=True), (80, 112)),
    "deit3": TimmCase("deit3_small_patch16_224", dict(img_size=(80, 112), depth=4), (80, 112)),
    "mae_base": TimmCase("vit_base_patch16_224.mae", dict(img_size=(80, 112), depth=2), (80, 112)),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_variants_are_the_untouched_model_at_all_fine_routing_and_cost_fvcores_count(case):
    model, x = VARIANTS[case].build()
    hw, e = model.patch_embed.dynamic_feat_size(x.shape[-2:]), model.num_prefix_tokens
    tokens = torch.randn(1, e + hw[0] * hw[1], model.embed_dim)
    with torch.no_grad():
        vanilla = FlopCountAnalysis(model.blocks[0], (tokens,)).total()
        reference = model.forward_features(x)
        dge.patch(model)
        set_logit_offset(model, [30.0])  # every region at φ = 1
        routed, _ = recorded(model.forward_features, x)
    assert max_diff(routed, reference) <= 1e-5
    fixed, per_query, delta = model.blocks[0].block.complexity(hw, e)
    assert fixed + delta + per_query * tokens.shape[1] == pytest.approx(vanilla, rel=1e-6)


def _twin_blocks(dim=32, heads=2):
    """A timm Block and dge's EncoderBlock with the same weights (q / kv = rows of qkv)."""
    torch.manual_seed(0)
    theirs = Block(dim, heads, mlp_ratio=2.0, qkv_bias=True).eval()
    ours = EncoderBlock(dim, SpatialReductionAttention(dim, heads, qkv_bias=True), mlp_ratio=2.0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
        own = dict(theirs.state_dict())
        qkv_w, qkv_b = own.pop("attn.qkv.weight"), own.pop("attn.qkv.bias")
        own.update({"attn.q.weight": qkv_w[:dim], "attn.q.bias": qkv_b[:dim]})
        own.update({"attn.kv.weight": qkv_w[dim:], "attn.kv.bias": qkv_b[dim:]})
        ours.load_state_dict(own)
    return theirs, ours


def test_the_adapter_equals_dge_encoder_block_on_random_routing():
    """Batch 2 with different maps (packed rows, padded per segment) and a class token: the
    adapter over timm's modules gives what dge's EncoderBlock (checked against a slow
    reference in tests/layers/test_encoder.py) gives."""
    theirs, ours = _twin_blocks()
    hw = (7, 9)
    adapted = DynamicGrainedEncoder(ViTAdapter(theirs), 32, num_extra_tokens=1).eval()
    reference = DynamicGrainedEncoder(ours, 32, num_extra_tokens=1).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 63, 32, generator=gen)
    gmap = torch.tensor([1, 2, 4])[torch.randint(0, 3, (2, 2, 3), generator=gen)]
    with torch.no_grad():
        assert max_diff(adapted(x, hw, granularity_map=gmap), reference(x, hw, gmap)) <= 1e-5
        assert max_diff(adapted.block(x), theirs(x)) == 0.0  # the adapter's own call: timm's block


@pytest.mark.parametrize("case", ["deit3", "eva"])
def test_timm_contract_holds_when_patched(case):
    """forward_intermediates, backward to every parameter (the routers included) and an FX
    trace (patched blocks and the recording patch embedding are leaves) of a patched model."""
    eva = TimmCase("eva02_tiny_patch14_224", dict(img_size=(84, 112), init_values=0.1, depth=4), (84, 112))
    model, x = (VARIANTS["deit3"] if case == "deit3" else eva).build()
    dge.patch(model)
    randomize_routers(model)
    with torch.no_grad():
        calibrate(model, lambda: model(x), 0.5, steps=10)
        final, maps = model.forward_intermediates(x[:1], indices=3)
        assert torch.equal(final, model.forward_features(x[:1])) and len(maps) == 3
        assert maps[0].shape == (1, model.embed_dim, *model.patch_embed.dynamic_feat_size(x.shape[-2:]))
        traced = torch.cat(tuple(fx_extractor(model)(x[:1]).values()))
        assert torch.equal(traced, model(x[:1]))
    model.train()
    model(x).logsumexp(dim=1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
