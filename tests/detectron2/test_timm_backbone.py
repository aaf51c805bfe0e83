"""Any timm model as a detectron2 backbone (``build_timm_fpn_backbone``): the Swin-T and PVT
v2-b2 configs, outputs named by stride into an FPN (a plain ViT into the simple pyramid),
all-fine DGE routing equal to the untouched backbone, clear errors, timm's no-decay names,
timm and official checkpoints through timm's own filter, and a training step of the PVT v2 demo
that routes every block and reaches every parameter."""
import copy
import re

import pytest
import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_backbone, build_model

import dge
from dge.config import load_config
from dge.detectron2.engine.optimizer import no_weight_decay_params
from dge.detectron2.vitdet import SimpleFeaturePyramid
from dge.layers import dge_modules
from train_helpers import one_training_step
from model_helpers import max_diff, recorded

import convert_pretrained  # tools/ (tests/conftest.py puts it on sys.path)

DEMO = "configs/demo_pvt_v2_dge_synthetic.yaml"
# Swin-T's layout (windows of 7, shifted in every stage) at a width and depth a test affords
SMALL_SWIN = ["MODEL.TIMM.KWARGS.embed_dim", 32, "MODEL.TIMM.KWARGS.depths", [2, 2, 2, 2],
              "MODEL.TIMM.KWARGS.num_heads", [1, 1, 2, 2]]


def test_the_swin_and_pvt_v2_configs_build_their_backbones():
    expected = {"swin_t": ("SwinTransformer", 12, 27.5), "pvt_v2_b2": ("PyramidVisionTransformerV2", 16, 24.8)}
    for name, (cls, blocks, millions) in expected.items():
        vanilla = build_backbone(load_config(f"configs/mask_rcnn_{name}_1x.yaml"))
        patched = build_backbone(load_config(f"configs/mask_rcnn_{name}_dge_1x.yaml"))
        model = patched.bottom_up.model
        assert type(model).__name__ == cls and not dge_modules(vanilla) and len(dge_modules(patched)) == blocks
        assert round(sum(p.numel() for p in vanilla.bottom_up.parameters()) / 1e6, 1) == millions
        assert {n: s.stride for n, s in patched.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32,
                                                                             "p6": 64}
    swin = build_backbone(load_config("configs/mask_rcnn_swin_t_dge_1x.yaml")).bottom_up.model
    last = swin.layers[3].blocks[1].block.original  # always_partition: the last stage shifts too
    assert tuple(last.shift_size) == (3, 3) and dge_modules(swin)[0].granularities == (1, 7)


@pytest.mark.parametrize("config, opts, hw", [
    ("configs/mask_rcnn_swin_t_dge_1x.yaml", SMALL_SWIN, (96, 160)),  # stage 1: 24×40 in windows of 7, padded
    (DEMO, [], (64, 96)),
])
def test_all_fine_routing_is_the_untouched_backbone(config, opts, hw):
    torch.manual_seed(0)
    patched = build_backbone(load_config(config, opts)).eval()
    vanilla = copy.deepcopy(patched)
    dge.unpatch(vanilla.bottom_up.model)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad(), dge.force_granularity(patched, 1):
        out, ref = patched(x), vanilla(x)
    assert out.keys() == ref.keys() and max(max_diff(out[k], ref[k]) for k in out) <= 1e-5


def test_a_plain_vit_gets_the_simple_feature_pyramid():
    cfg = load_config(DEMO, ["MODEL.TIMM.NAME", "vit_tiny_patch16_224", "MODEL.TIMM.OUT_INDICES", [-1],
                             "MODEL.TIMM.KWARGS.dynamic_img_size", True, "MODEL.TIMM.KWARGS.depth", 2])
    backbone = build_backbone(cfg).eval()
    assert isinstance(backbone, SimpleFeaturePyramid) and len(dge_modules(backbone)) == 2
    with torch.no_grad():
        out, record = recorded(backbone, torch.randn(1, 3, 96, 160))
    assert {n: tuple(t.shape[-2:]) for n, t in out.items()} == {
        "p2": (24, 40), "p3": (12, 20), "p4": (6, 10), "p5": (3, 5), "p6": (2, 3)}
    assert len(record.infos) == 2


@pytest.mark.parametrize("opts, message", [
    (["MODEL.TIMM.NAME", "swin_gigantic"], "is not a timm model"),
    (["MODEL.TIMM.NAME", "vit_tiny_patch16_224", "MODEL.TIMM.OUT_INDICES", [5, 11]], "several maps of one stride"),
    (["MODEL.TIMM.OUT_INDICES", [1, 2, 3]], r"\['res2'\] not among the timm backbone's outputs"),
    (["MODEL.TIMM.NAME", "swin_tiny_patch4_window7_224", "MODEL.TIMM.KWARGS.dynamic_img_size", True],
     "region size 4 does not divide"),
])
def test_bad_timm_configs_are_rejected_with_a_clear_error(opts, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(load_config(DEMO, opts))


def test_timm_no_weight_decay_names_are_kept_from_decay():
    backbone = build_backbone(load_config("configs/mask_rcnn_swin_t_dge_1x.yaml", SMALL_SWIN))
    skip = no_weight_decay_params(backbone)
    tables = [n for n, _ in backbone.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 8 and set(tables) <= skip


def test_a_training_step_routes_every_block_and_reaches_every_parameter(data_root):
    cfg = load_config(DEMO, ["DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2])
    losses, record, unused = one_training_step(cfg)
    assert "loss_budget" in losses and len(record.infos) == 8 and unused == []


def _official_swin_layout(sd):
    """timm's Swin state dict as Microsoft's release lays it out: each stage's patch merging at
    its end (timm: at the next stage's start), ``head.*``, relative-position index buffers."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
        if k.endswith("relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(49, 49, dtype=torch.long)
    return out


def _official_pvt_v2_layout(sd):
    """timm's PVT v2 state dict as whai362/PVT (v2 branch) lays it out."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}", k)
        k = re.sub(r"stages\.(\d+)\.downsample", lambda m: f"patch_embed{int(m.group(1)) + 1}", k)
        k = re.sub(r"stages\.(\d+)\.norm", lambda m: f"norm{int(m.group(1)) + 1}", k)
        out[k.replace("patch_embed.", "patch_embed1.").replace("dwconv.", "dwconv.dwconv.")] = v
    return out


@pytest.mark.parametrize("config, opts, layout", [
    ("configs/mask_rcnn_swin_t_dge_1x.yaml", SMALL_SWIN, lambda sd: sd),
    ("configs/mask_rcnn_swin_t_dge_1x.yaml", SMALL_SWIN, _official_swin_layout),
    (DEMO, [], _official_pvt_v2_layout),
], ids=["swin_timm", "swin_official", "pvt_v2_official"])
def test_timm_and_official_checkpoints_convert_through_timms_filter(tmp_path, config, opts, layout):
    """A classification checkpoint (timm's layout, or the authors' through timm's own
    checkpoint_filter_fn) converted for the DGE detector loads every backbone tensor: at
    all-fine routing its maps are the checkpoint's model's; only routers stay initial."""
    cfg = load_config(config, opts)
    torch.manual_seed(1)
    timm_model = timm.create_model(cfg.MODEL.TIMM.NAME, **dict(cfg.MODEL.TIMM.KWARGS)).eval()
    src, out = tmp_path / "in.pth", tmp_path / "d2.pth"
    torch.save(layout(timm_model.state_dict()), src)
    assert convert_pretrained.main([str(src), str(out), "--config-file", config, *map(str, opts)]) == 0
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(str(out))
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad(), dge.force_granularity(model, 1):
        maps = model.backbone.bottom_up(x)
        reference = timm_model.forward_intermediates(x, indices=4, intermediates_only=True)
    assert max(max_diff(a, b) for a, b in zip(maps.values(), reference)) <= 1e-5
    conversion = dge.convert_timm_state_dict(torch.load(src), model.backbone.bottom_up.model)
    assert conversion.missing == conversion.initial_routers != [] and not conversion.unexpected
    assert "head.fc.weight" in conversion.dropped or "head.weight" in conversion.dropped
