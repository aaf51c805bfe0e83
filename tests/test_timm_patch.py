"""dge.patch / dge.unpatch on timm's vision transformers (random weights: no hub here):
all-fine routing is the untouched model, the original checkpoint loads, the adapter equals
dge's own verified block on random routing, β's costs are fvcore's counts, and timm's
model contract (forward_intermediates, backward, FX) and torch.export hold when patched."""
import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import build_rotary_pos_embed
from timm.models.vision_transformer import Block

import dge
from dge.analysis.calibration import calibrate, randomize_routers, set_logit_offset
from dge.analysis.syncs import count_host_reads
from dge.layers import DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention, complexity_report
from dge.modeling.timm_patch import TimmBlock, TokenGrid, rope_at_centers
from model_helpers import fx_extractor, recorded

# name -> (timm model, kwargs): grids of 5×7 patches (regions of 4 cut at the borders).
CASES = {
    "vit_small": ("vit_small_patch16_224", dict(img_size=(80, 112))),
    "vit_base": ("vit_base_patch16_224", dict(img_size=(80, 112))),
    "vit_small_qk_norm": ("vit_small_patch16_224", dict(img_size=(80, 112), qk_norm=True)),
    "deit3_small": ("deit3_small_patch16_224", dict(img_size=(80, 112))),
    "mae_base": ("vit_base_patch16_224.mae", dict(img_size=(80, 112))),
    "dinov2_reg4_small": ("vit_small_patch14_reg4_dinov2", dict(img_size=(70, 98))),
    # EVA-02: RoPE rescaled to a 16×16 pre-training grid; fused qkv with q/v biases (tiny),
    # separate projections and a normed SwiGLU (base); 6×8 patches (the smallest it takes)
    "eva02_tiny_ls": ("eva02_tiny_patch14_224", dict(img_size=(84, 112), init_values=0.1, depth=6)),
    "eva02_base": ("eva02_base_patch14_224", dict(img_size=(84, 112))),
}


def make(case: str, seed: int = 0):
    """(model in eval mode, input [2, 3, H, W]); layer scales and norms drawn at random so
    that every block changes its input (timm's init leaves DeiT III's scales at 1e-6)."""
    name, kwargs = CASES[case]
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("gamma", "gamma_1", "gamma_2", "norm1.weight", "norm2.weight")):
                p.normal_(1.0 if "norm" in n else 0.0, 0.5)
    return model, torch.randn(2, 3, *kwargs["img_size"])


def route(model, x, target: float = 0.5):
    """Content routers (random gates), calibrated to β ≈ ``target`` on ``x``."""
    randomize_routers(model)
    with torch.no_grad():
        calibrate(model, lambda: model(x), target, steps=10)
    return model


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_all_fine_routing_equals_the_untouched_model(case):
    model, x = make(case)
    with torch.no_grad():
        reference = model.forward_features(x)
        dge.patch(model)
        with dge.force_granularity(model, 1):  # the vanilla call of each block
            forced = model.forward_features(x)
        set_logit_offset(model, [30.0])  # routers choose φ = 1: queries gathered, packed, unpacked
        routed, record = recorded(model.forward_features, x)
    assert max_diff(forced, reference) <= 1e-5 and max_diff(routed, reference) <= 1e-5
    beta = complexity_report(record, model).beta  # 1 + the routers' own cost
    assert torch.all((beta >= 1.0) & (beta < 1.001))


def test_the_original_checkpoint_loads_and_unpatch_gives_the_original_back():
    model, x = make("dinov2_reg4_small")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    blocks, embed_class = list(model.blocks), type(model.patch_embed)
    with torch.no_grad():
        reference = model.forward_features(x)
    patched = dge.patch(make("dinov2_reg4_small", seed=1)[0])
    loaded = patched.load_state_dict(original, strict=False)
    assert not loaded.unexpected_keys
    assert loaded.missing_keys and all(".router." in k for k in loaded.missing_keys)
    assert {k.replace(".block.", ".") for k in patched.state_dict() if ".router." not in k} == set(original)
    with torch.no_grad(), dge.force_granularity(patched, 1):
        assert max_diff(patched.forward_features(x), reference) <= 1e-5
    dge.patch(model)
    assert dge.unpatch(model) is model and list(model.blocks) == blocks and type(model.patch_embed) is embed_class
    assert set(model.state_dict()) == set(original) and not hasattr(model.patch_embed, "dge_grid")
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), reference)


def test_patched_blocks_take_the_mode_of_the_blocks_they_wrap():
    model = dge.patch(make("vit_small")[0])  # in eval mode: routers choose by argmax
    assert not any(m.training for m in model.modules())
    assert all(m.training for m in dge.patch(timm.create_model("vit_small_patch16_224", img_size=32)).modules())


def test_patch_says_what_it_cannot_take():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        dge.patch(torch.nn.Linear(2, 2))
    model = timm.create_model("vit_small_patch16_224", img_size=32, attn_layer="diff")
    with pytest.raises(TypeError, match="block 0 is Block with DiffAttention"):
        dge.patch(model)
    model = dge.patch(make("vit_small")[0])
    with pytest.raises(ValueError, match="already patched"):
        dge.patch(model)
    with pytest.raises(ValueError, match="not patched"):
        dge.unpatch(dge.unpatch(model))


@pytest.mark.parametrize("offset", [0.5, 1.5, 0.25])
def test_rotary_table_at_pooled_centres_is_timms_table_there(offset):
    """EVA-02's table (rescaled grid, both layouts) at centres off the tokens equals timm's
    own table built on the grid shifted by that much; extra tokens (centre 0) unrotated."""
    model = timm.create_model("eva02_tiny_patch14_224", img_size=(84, 112))
    hw, rope = (6, 8), model.rope
    for half in (False, True):
        table = lambda shift: torch.cat(build_rotary_pos_embed(
            list(hw), bands=rope.bands, in_pixels=False, ref_feat_shape=rope.ref_feat_shape,
            grid_offset=shift, rotate_half=half), dim=-1)
        i, j = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        centers = torch.stack([i, j], dim=-1).view(1, -1, 2) + 0.5 + offset
        got = rope_at_centers(table(0.0), hw, torch.cat([torch.zeros(1, 1, 2), centers], dim=1))[0]
        inside = (centers[0] < torch.tensor(hw)).all(dim=1)  # a centre past the last token: not a pooled one
        assert max_diff(got[1:][inside], table(offset)[inside]) <= 2e-6
        assert torch.equal(got[0], torch.cat([torch.zeros(rope.dim), torch.ones(rope.dim)]))


def test_patched_eva_says_which_grids_its_rotary_table_allows():
    model = dge.patch(timm.create_model("eva02_tiny_patch14_224", img_size=(70, 112)).eval())
    with pytest.raises(ValueError, match="5x8 patch grid turns .* at least 6 patches a side"):
        model.forward_features(torch.randn(1, 3, 70, 112))


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
    reference in test_dge_layer.py) gives."""
    theirs, ours = _twin_blocks()
    hw, grid = (7, 9), TokenGrid()
    grid.hw = hw
    adapted = DynamicGrainedEncoder(TimmBlock(theirs, grid), 32, num_extra_tokens=1).eval()
    reference = DynamicGrainedEncoder(ours, 32, num_extra_tokens=1).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1 + 63, 32, generator=gen)
    gmap = torch.tensor([1, 2, 4])[torch.randint(0, 3, (2, 2, 3), generator=gen)]
    with torch.no_grad():
        assert max_diff(adapted(x, granularity_map=gmap), reference(x, hw, gmap)) <= 1e-5
        assert max_diff(adapted.block(x, hw), theirs(x)) == 0.0


@pytest.mark.parametrize("case", ["vit_small_qk_norm", "dinov2_reg4_small", "eva02_base"])
def test_beta_costs_are_fvcore_counts(case):
    """A block's (fixed, per-query) cost at every token is fvcore's count of the timm block,
    and the patched model's per-image trace counts what β's accounting says."""
    model, x = make(case)
    hw, e = model.patch_embed.dynamic_feat_size(x.shape[-2:]), model.num_prefix_tokens
    tokens = torch.randn(1, e + hw[0] * hw[1], model.embed_dim)
    vanilla = dge.FlopCountAnalysis(model.blocks[0], (tokens,)).total()
    dge.patch(model)
    fixed, per_query = model.blocks[0].block.complexity(hw, e)
    assert fixed + per_query * tokens.shape[1] == pytest.approx(vanilla, rel=0.005)
    route(model, x[:1])
    with torch.no_grad():
        _, record = recorded(model.forward_features, x[:1])
        counted = dge.FlopCountAnalysis(model, (x[:1],)).by_module()
    dynamic = complexity_report(record, model).dynamic_flops.sum()
    blocks = sum(counted[dge.FlopCountAnalysis.traced_name(f"blocks.{i}")] for i in range(len(model.blocks)))
    assert float(dynamic) == pytest.approx(blocks, rel=0.005)
    assert float(complexity_report(record, model).beta) == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize("case", ["deit3_small", "eva02_tiny_ls"])
def test_timm_contract_holds_when_patched(case):
    """forward_intermediates, backward to every parameter (the routers included) and an FX
    trace (patched blocks and the recording patch embedding are leaves) of a patched model."""
    model, x = make(case)
    route(dge.patch(model), x)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x[:1], indices=3)
        assert torch.equal(final, model.forward_features(x[:1])) and len(maps) == 3
        assert maps[0].shape == (1, model.embed_dim, *model.patch_embed.dynamic_feat_size(x.shape[-2:]))
        traced = torch.cat(tuple(fx_extractor(model)(x[:1]).values()))
        assert torch.equal(traced, model(x[:1]))
    model.train()
    model(x).logsumexp(dim=1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("case", ["vit_small", "eva02_tiny_ls"])
def test_torch_export_of_a_patched_model_stays_dynamic(case):
    """One graph exported at one image's routing runs another image's routing exactly."""
    model, x = make(case)
    route(dge.patch(model), x)
    with torch.no_grad():
        program = torch.export.export(model, (x[:1],))
        for image in (x[:1], x[1:]):
            assert max_diff(program.module()(image), model(image)) <= 1e-5
        _, first = recorded(model, x[:1])
        _, second = recorded(model, x[1:])
    assert not torch.equal(first.infos[0].granularity_map, second.infos[0].granularity_map)


@pytest.mark.parametrize("case", ["vit_small", "eva02_tiny_ls"])
def test_patched_inference_reads_one_nonzero_per_block(case):
    """Batch 2 at β ≈ 0.5: the query count of each block is the shape of one nonzero; the
    rotary table at pooled centres is computed without reading a value."""
    model, x = make(case)
    route(dge.patch(model), x)
    with torch.no_grad():
        assert count_host_reads(lambda: model(x)) == {"aten::nonzero": len(model.blocks)}
