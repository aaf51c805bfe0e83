"""Per-image FLOPs of dge models (dge.analysis) against hand counts and the analytic Eq. 7."""
import importlib.util
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dge.analysis import FlopCountAnalysis, analyze_image, analyze_images, force_granularity, format_flops_report
from dge.layers import DeformableAttention, DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
from model_helpers import recorded
from dge.models import PyramidVisionTransformer
from repo import ROOT

C = 16


def count(module: nn.Module, *inputs) -> int:
    return FlopCountAnalysis(module.eval(), inputs).unsupported_ops_warnings(False).total()


def pvt_block(sr_ratio: int = 2) -> EncoderBlock:
    torch.manual_seed(0)
    attn = SpatialReductionAttention(C, num_heads=2, qkv_bias=True, sr_ratio=sr_ratio)
    return EncoderBlock(C, attn, mlp_ratio=2.0).eval()


def tiny_pyramid(dge=None, attention: str = "sr") -> PyramidVisionTransformer:
    """PVT (or DPVT) with one block per stage, half PVT's widths, PVT's heads, MLP and SR
    ratios: block costs in PVT's proportions."""
    torch.manual_seed(0)
    model = PyramidVisionTransformer(
        img_size=64, num_classes=0, global_pool="avg", depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256),
        attention=attention, dge=dge,
    )
    return model.eval()


def random_maps(seed: int, phi=(1, 2, 4)):
    gen = torch.Generator().manual_seed(seed)
    return lambda name, regions: torch.tensor(phi)[torch.randint(0, len(phi), regions, generator=gen)]


# ------------------------------------------------------------------ one handle each
def test_fused_attention_counts_both_products():
    class Attention(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 6)
    assert count(Attention(), q, k, v) == 2 * 3 * 5 * 7 * (8 + 6)  # q·kᵀ + attn·v


def test_grid_sample_counts_four_taps_per_bilinear_sample():
    class Sample(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.mode = mode

        def forward(self, value, grid):
            return F.grid_sample(value, grid, mode=self.mode, align_corners=False)

    value, grid = torch.randn(2, 3, 10, 12), torch.rand(2, 4, 5, 2) * 2 - 1
    sampled = 2 * 3 * 4 * 5  # N·C·out_points
    assert count(Sample("bilinear"), value, grid) == sampled * 4
    assert count(Sample("nearest"), value, grid) == sampled


def test_dge_block_with_a_known_map_matches_the_hand_count():
    dge = DynamicGrainedEncoder(pvt_block(), C, dict(granularities=(0, 1, 2, 4))).eval()
    x = torch.randn(1, 64, C)
    gmap = torch.tensor([[[1, 2], [4, 0]]])  # 16 + 4 + 1 + 0 queries on an 8×8 map
    image = analyze_image(dge, (x, (8, 8), gmap))
    m, n, nk = 21, 64, 16  # queries, tokens, keys (SR ratio 2)
    fixed = 5 * n * C + n * C * C + 5 * nk * C + nk * C * 2 * C  # norm1(context), sr conv + norm, kv
    per_query = 5 * C + C * C + 2 * nk * C + C * C + 5 * C + 2 * C * 2 * C  # norm1, q, q·kᵀ+a·v, proj, norm2, mlp
    assert image.total == fixed + m * per_query == image.layers[0].analytic
    # The vanilla block normalises its input once (the analytic count has norm1 twice).
    assert image.static_total == fixed + n * per_query - 5 * n * C
    assert image.zero_flop_ops["data movement"]["aten::index_select"] > 0
    assert image.zero_flop_ops["data movement"]["aten::avg_pool2d"] > 0
    assert not image.unsupported_ops


def test_deformable_dge_block_counts_the_sampling_and_not_the_weighted_sum():
    torch.manual_seed(0)
    attn = DeformableAttention(C, num_heads=2, num_points=3, qkv_bias=True)
    dge = DynamicGrainedEncoder(EncoderBlock(C, attn, mlp_ratio=2.0), C).eval()
    gmap = torch.tensor([[[2, 4], [1, 2]]])
    image = analyze_image(dge, (torch.randn(1, 64, C), (8, 8), gmap))
    m = 4 + 1 + 16 + 4
    assert image.by_operator["grid_sampler"] == m * 2 * 3 * (C // 2) * 4  # heads·points·d values, 4 taps
    # Eq. 7's count has the weighted sum over points (points·C per query); fvcore's
    # convention counts that mul + sum as elementwise (0).
    assert image.total == image.layers[0].analytic - m * 3 * C


# ------------------------------------------------------------------ static vs dynamic
def test_all_regions_at_granularity_one_give_dynamic_equal_to_static():
    model = tiny_pyramid(dge=True)
    x = torch.randn(1, 3, 64, 96)
    with force_granularity(model, 1):
        forced = analyze_image(model, (x,))
    assert forced.total == forced.static_total
    assert forced.beta == 1.0 and all(layer.beta == 1.0 for layer in forced.layers)
    # The static model is exactly the vanilla model.
    vanilla = analyze_image(tiny_pyramid(dge=None), (x,))
    assert vanilla.total == forced.static_total and not vanilla.layers
    # Routed by a fresh router (finest grain everywhere): the routers are the only extra cost.
    routed = analyze_image(model, (x,))
    with torch.no_grad():
        _, record = recorded(model, x)
    routers = sum(m.router.flops(m.layout(info.hw, "cpu").num_regions) for m, info in record)
    assert all(info.granularity_map.eq(1).all() for info in record.infos)
    assert routed.total - routed.static_total == routers > 0


@pytest.mark.parametrize("attention", ["sr", "deformable"])
def test_forced_maps_counted_match_the_analytic_count_within_2_percent(attention):
    model = tiny_pyramid(dge=True, attention=attention)
    with force_granularity(model, random_maps(seed=1)):
        image = analyze_image(model, (torch.randn(1, 3, 64, 96),))
    assert 0.2 < image.beta < 0.9
    assert abs(image.beta - image.beta_analytic) / image.beta_analytic < 0.02
    for layer in image.layers:
        assert abs(layer.counted - layer.analytic) / layer.analytic < 0.02, layer.name
        assert abs(layer.beta - layer.beta_analytic) / layer.beta_analytic < 0.02, layer.name
    # The backbone shrinks by the DGE blocks' saving and nothing else.
    saved = sum(layer.counted_static - layer.counted for layer in image.layers)
    assert image.static_total - image.total == pytest.approx(saved)


def test_two_images_with_different_routing_give_different_flops_and_the_report_lists_each():
    model = tiny_pyramid(dge=dict(init_fine_prob=1 / 3))  # untrained routers with zero bias
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, DynamicGrainedEncoder):
            nn.init.normal_(m.router.gate.weight, std=1.0)  # route by content
    flat = torch.full((1, 3, 64, 96), 0.5)
    textured = torch.randn(1, 3, 64, 96)
    images = analyze_images(model, [(flat,), (textured,)], names=["flat", "textured"])
    assert images[0].total != images[1].total
    assert images[0].static_total == images[1].static_total
    for image in images:  # router-driven: each block's count is Eq. 7 with its router
        assert abs(image.beta - image.beta_analytic) / image.beta_analytic < 0.02
    report = format_flops_report(images)
    for image in images:
        assert image.name in report
        assert f"{image.total / 1e6:.2f}" in report  # MFLOPs at this size


def test_force_granularity_rejects_a_granularity_outside_phi():
    model = tiny_pyramid(dge=dict(granularities=(1, 2)))
    with pytest.raises(ValueError, match=r"granularity 4 is not in Φ of DGE block 'stages.0.blocks.0'"):
        with force_granularity(model, 4):
            pass


# ------------------------------------------------------------------ bad input
def test_model_without_dge_blocks_reports_static_flops():
    image = analyze_image(tiny_pyramid(dge=None), (torch.randn(1, 3, 64, 64),))
    assert image.total == image.static_total > 0
    assert image.beta is None and image.beta_analytic is None and not image.layers
    assert "no DGE blocks: static FLOPs only" in format_flops_report([image])


def test_unsupported_op_is_named_in_the_report_never_silently_zero():
    @torch.jit.script
    def scripted_scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.cdist(self.fc(x), x[:, :3]) + scripted_scale(x).sum()

    image = analyze_image(Odd(), (torch.randn(5, 4),))
    assert image.total == 5 * 4 * 3  # the linear only
    assert "aten::cdist" in image.unsupported_ops and len(image.unsupported_ops) == 2
    assert any(op.startswith("prim::CallFunction[") and op.endswith("scripted_scale]") for op in image.unsupported_ops)
    report = format_flops_report([image])
    assert "UNSUPPORTED" in report and "aten::cdist" in report and "scripted_scale" in report


def test_a_batch_is_rejected_per_image_flops_need_one_image():
    with pytest.raises(ValueError, match="one image at a time; got a batch of 2"):
        analyze_image(tiny_pyramid(dge=True), (torch.randn(2, 3, 64, 64),))


# ------------------------------------------------------------------ the tool, on Mask R-CNN
def test_analyze_model_tool_reports_per_image_flops_of_a_mask_rcnn(tmp_path):
    spec = importlib.util.spec_from_file_location("analyze_model", ROOT / "tools" / "analyze_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tiny_heads = [
        "MODEL.DGE.INIT_FINE_PROB", "0.34", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "20",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "32", "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5",
    ]
    args = tool.get_parser().parse_args(
        ["--config-file", str(ROOT / "configs" / "mask_rcnn_pvt_t_dge_1x.yaml"), "--tasks", "flop",
         "--num-inputs", "2", "--input-size", "64", "96", "--json", str(tmp_path / "flops.json"),
         "--output", str(tmp_path), *tiny_heads]
    )
    result = tool.main(args)["flop"]
    assert "random initialisation" in result["report"] and "β (DGE blocks, analytic Eq. 7)" in result["report"]
    saved = json.loads((tmp_path / "flops.json").read_text())
    assert saved["weights"] == tool.RANDOM_INIT and len(saved["images"]) == 2
    assert saved["summary"]["gflops"]["mean"] == pytest.approx(result["summary"]["gflops"]["mean"])
    image = saved["images"][0]
    groups = ["backbone.bottom_up", "backbone.fpn", "proposal_generator", "roi_heads"]
    if "other (outside submodules)" in image["by_module_gflops"]:  # detectron2 v0.6 traces mask pasting
        groups.append("other (outside submodules)")
    else:  # current detectron2 scripts it: named as not counted, never silently dropped
        assert "UNSUPPORTED" in result["report"] and "paste_masks_in_image" in result["report"]
    assert list(image["by_module_gflops"]) == groups
    assert len(image["layers"]) == 8 and len(image["stages"]) == 4
    assert abs(image["beta"] - image["beta_analytic"]) < 0.02
    assert (tmp_path / tool.PLOT_NAME).stat().st_size > 0


@pytest.mark.parametrize("name", ["deit_tiny_dge", "pvt_tiny_dge"])
def test_the_classifiers_per_image_gflops_equal_fvcores_count(name):
    """The classifier logs one trace's count outside the DGE blocks + each image's analytic
    block count (``outside_dge_flops``): equal to fvcore's count of that image within 0.3%."""
    import timm

    from dge.layers.calibration import calibrate, randomize_routers
    from dge.analysis.flops import outside_dge_flops
    from dge.layers import complexity_report

    model = timm.create_model(name, num_classes=10, img_size=64).eval()
    randomize_routers(model, seed=3)  # images route differently
    torch.manual_seed(0)
    images = (torch.randn(1, 3, 64, 64), torch.rand(1, 3, 64, 64))
    calibrate(model, lambda: model(torch.cat(images)), target=0.5)
    outside, static = outside_dge_flops(model, (3, 64, 64))
    for image in images:
        with torch.no_grad():
            _, record = recorded(model, image)
        logged = outside + complexity_report(record, model).dynamic_flops.sum().item()
        counted = analyze_image(model, (image,))
        assert 0.1 < counted.beta < 0.95, counted.beta
        assert logged == pytest.approx(counted.total, rel=3e-3)
        assert static == pytest.approx(counted.static_total, rel=3e-3)
