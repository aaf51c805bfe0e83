"""Official checkpoints -> this project: the converted models compute what the official code
computes.

The state dicts below are laid out as the official code lays them out (random values):
whai362/PVT v1 (classification ``pvt.py``; detection ``detection/pvt.py`` loads the same
file), vtpack's ``pvt_dge_s124_*_256`` and ``dpvt_*_256`` and timm's DeiT. The ``official_*``
functions re-implement those forward passes from their definitions (explicit
softmax(q·kᵀ)·v, vtpack's region loop, bilinear sampling by hand) in float64, so a 1e-4
difference means a real mismatch.
"""
import logging
import subprocess
import sys

import pytest
import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from dge.config import add_dge_config
from dge.models import convert
from dge.models.convert import convert_deit_state_dict
from dge.models.convert import convert_pvt_state_dict
from dge.models.parts import resample_pos_embed
from model_helpers import recorded
from official_pvt import SMALL, TINY, official_pvt_forward, official_pvt_state_dict
from repo import ROOT

import convert_pretrained  # tools/ (tests/conftest.py puts it on sys.path)

def _f64(sd):
    return {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}


def _save(sd, tmp_path, name):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _d2_model(config, *opts):
    cfg = get_cfg()
    add_dge_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return build_model(cfg).eval()


# ------------------------------------------------------------------ faithfulness
def test_official_pvt_small_layout_has_the_published_parameter_count():
    sd = official_pvt_state_dict(SMALL)
    total = sum(v.numel() for v in sd.values())
    head = sd["head.weight"].numel() + sd["head.bias"].numel()
    assert round(total / 1e6, 2) == 24.49  # pvt_small, as the PVT v1 README
    assert round((total - head) / 1e6, 2) == 23.97


def test_official_pvt_v1_weights_give_the_official_logits(tmp_path):
    sd = official_pvt_state_dict(SMALL)
    path = _save(sd, tmp_path, "pvt_small.pth")
    model = timm.create_model("pvt_small", pretrained=True, img_size=224, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 96, 160, dtype=torch.float64)  # 24×40 .. 3×5 maps: every grid resampled
    with torch.no_grad():
        ours = model.double().eval()(x)
        ref = official_pvt_forward(_f64(sd), x, SMALL, 224, classify=True)
    assert ref.abs().mean() > 0.1
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_official_pvt_v1_weights_give_the_official_detection_features(tmp_path):
    sd = official_pvt_state_dict(SMALL, seed=1)
    src, out = _save(sd, tmp_path, "pvt_small.pth"), tmp_path / "pvt_small_d2.pth"
    config = str(ROOT / "configs/mask_rcnn_pvt_s_1x.yaml")
    assert convert_pretrained.main([str(src), str(out), "--config-file", config]) == 0
    model = _d2_model("mask_rcnn_pvt_s_1x.yaml")
    incompatible = DetectionCheckpointer(model)._load_model(torch.load(out, weights_only=True))
    assert not [k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up")]
    assert not incompatible.unexpected_keys
    x = torch.randn(1, 3, 160, 96, dtype=torch.float64)
    with torch.no_grad():
        ours = model.backbone.bottom_up.double()(x)
        ref = official_pvt_forward(_f64(sd), x, SMALL, 224, classify=False)
    for name, r in zip(("res2", "res3", "res4", "res5"), ref):
        torch.testing.assert_close(ours[name], r, atol=1e-4, rtol=1e-4)


def _routing_maps(record):
    return [info.granularity_map for info in record.infos]


def test_vtpack_pvt_dge_weights_give_vtpack_logits_and_routing(tmp_path):
    sd = official_pvt_state_dict(SMALL, img_size=256, dge_splits=[4, 2, 1], seed=2)  # pvt_dge_s124_small_256
    path = _save(sd, tmp_path, "pvt_dge_s124_small_256.pth")
    model = timm.create_model("pvt_small_dge", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 128, 128, dtype=torch.float64)
    choices = []
    with torch.no_grad():
        ours, record = recorded(model.double().eval(), x)
        ref = official_pvt_forward(_f64(sd), x, SMALL, 256, True, choices=choices)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # The same granularity per region (vtpack split k = granularity 4 / k) in every block.
    splits = torch.tensor([4, 2, 1])
    for mine, theirs in zip(_routing_maps(record), choices):
        assert torch.equal(mine, 4 // splits[theirs])
    assert {int(g) for m in _routing_maps(record) for g in m.unique()} == {1, 2, 4}


def test_vtpack_pvt_dge_weights_give_the_same_detection_features(tmp_path):
    sd = official_pvt_state_dict(SMALL, img_size=256, dge_splits=[4, 2, 1], seed=3)
    src, out = _save(sd, tmp_path, "pvt_dge.pth"), tmp_path / "pvt_dge_d2.pth"
    config, opts = "mask_rcnn_pvt_s_dge_1x.yaml", ["MODEL.PVT.PRETRAIN_IMG_SIZE", "256"]
    assert convert_pretrained.main([str(src), str(out), "--config-file", str(ROOT / "configs" / config), *opts]) == 0
    model = _d2_model(config, *opts)
    DetectionCheckpointer(model).load(str(out))
    x = torch.randn(1, 3, 128, 256, dtype=torch.float64)
    with torch.no_grad():
        ours, record = recorded(model.backbone.bottom_up.double(), x)
        ref = official_pvt_forward(_f64(sd), x, SMALL, 256, False, choices=[])
    for name, r in zip(("res2", "res3", "res4", "res5"), ref):
        torch.testing.assert_close(ours[name], r, atol=1e-4, rtol=1e-4)
    assert len({int(g) for m in _routing_maps(record) for g in m.unique()}) == 3


def test_vtpack_dpvt_weights_give_vtpack_logits(tmp_path):
    sd = official_pvt_state_dict(TINY, img_size=256, cls_token=False, deformable=True, seed=4)  # dpvt_tiny_256
    path = _save(sd, tmp_path, "dpvt_tiny_256.pth")
    model = timm.create_model("dpvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, 3, 96, 160, dtype=torch.float64)
    with torch.no_grad():
        ours = model.double().eval()(x)
        ref = official_pvt_forward(_f64(sd), x, TINY, 256, True, deformable=True)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_timm_deit_weights_give_timm_logits():
    torch.manual_seed(5)
    reference = timm.create_model("deit_tiny_patch16_224").double().eval()
    for p in reference.parameters():  # random, not the zero-initialised biases
        p.data.normal_(0, 0.05)
    ours = timm.create_model("deit_tiny_vanilla", img_size=224).double().eval()
    conversion = convert_deit_state_dict(reference.state_dict(), ours)
    assert not conversion.missing and not conversion.unexpected
    ours.load_state_dict(conversion.state_dict)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ conversion behaviour
def test_vtpack_deit_dge_checkpoint_converts_completely():
    """vtpack's deit_dge_s124_*: split attn.q / attn.kv, blocks.N.dge.router.gate, blocks.N.dge.splits."""
    sd = {}
    for k, v in timm.create_model("deit_tiny_patch16_224", img_size=256).state_dict().items():
        if ".attn.qkv." in k:
            c = v.shape[0] // 3
            sd[k.replace("qkv", "q")], sd[k.replace("qkv", "kv")] = v[:c], v[c:]
        else:
            sd[k] = v
    for i in range(12):
        sd[f"blocks.{i}.dge.router.gate.weight"] = torch.randn(3, 192)
        sd[f"blocks.{i}.dge.router.gate.bias"] = torch.tensor([1.0, 2.0, 3.0])
        sd[f"blocks.{i}.dge.splits"] = torch.tensor([4, 2, 1])
    model = timm.create_model("deit_tiny_dge")
    conversion = convert_deit_state_dict(sd, model)
    assert conversion.source == "vtpack DeiT+DGE"
    assert not conversion.missing and not conversion.unexpected and not conversion.dropped
    model.load_state_dict(conversion.state_dict)
    assert model.blocks[5].router.gate.bias.tolist() == [1.0, 2.0, 3.0]  # splits 4, 2, 1 = Φ 1, 2, 4


def test_dge_checkpoint_loads_into_the_vanilla_model_without_its_routers():
    sd = timm.create_model("pvt_tiny_dge").state_dict()
    model = timm.create_model("pvt_tiny")
    conversion = convert_pvt_state_dict(sd, model)
    assert not conversion.missing and not conversion.unexpected
    assert len(conversion.dropped) == 16 and all("DGE router" in why for why in conversion.dropped.values())
    model.load_state_dict(conversion.state_dict)
    assert torch.equal(model.stages[2].blocks[1].attn.q.weight, sd["stages.2.blocks.1.block.attn.q.weight"])


def test_position_embeddings_are_resampled_to_the_model_grid():
    sd = official_pvt_state_dict(TINY, img_size=224)
    model = timm.create_model("pvt_tiny", img_size=256)
    conversion = convert_pvt_state_dict(sd, model)
    assert conversion.resampled["stages.0.pos_embed"] == "56×56 -> 64×64"
    assert conversion.resampled["stages.3.pos_embed"] == "7×7 -> 8×8"
    expected = resample_pos_embed(sd["pos_embed4"], (7, 7), (8, 8), num_extra=1)
    assert torch.equal(conversion.state_dict["stages.3.pos_embed"], expected)
    model.load_state_dict(conversion.state_dict)


def test_detection_backbone_drops_classification_keys_with_reasons():
    sd = official_pvt_state_dict(TINY)
    backbone = _d2_model("mask_rcnn_pvt_t_1x.yaml").backbone.bottom_up
    conversion = convert_pvt_state_dict(sd, backbone)
    classification = {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias", "stages.3.pos_embed[0]"}
    assert set(conversion.dropped) == classification
    assert not conversion.missing and not conversion.unexpected
    backbone.load_state_dict(conversion.state_dict)


def test_vanilla_weights_in_a_dge_model_leave_routers_initial_and_say_so(tmp_path, caplog):
    sd = official_pvt_state_dict(TINY)
    src, out = _save(sd, tmp_path, "pvt_tiny.pth"), tmp_path / "pvt_tiny_dge_d2.pth"
    with caplog.at_level(logging.INFO):
        code = convert_pretrained.main([str(src), str(out), "--model", "pvt_tiny_dge", "--format", "d2"])
    assert code == 0
    expected = "16 router tensors (e.g. stages.0.blocks.0.router.gate.weight) are left at their initial values"
    assert expected in caplog.text
    written = torch.load(out, weights_only=True)["model"]
    assert not any(".router." in k for k in written)
    assert "backbone.bottom_up.stages.0.blocks.0.block.attn.q.weight" in written
    model = _d2_model("mask_rcnn_pvt_t_dge_1x.yaml")
    routers = {k: v.clone() for k, v in model.state_dict().items() if ".router.gate." in k}  # the weights (budget tables are state)
    incompatible = DetectionCheckpointer(model)._load_model({"model": written})
    assert sorted(k for k in incompatible.missing_keys if k.startswith("backbone.bottom_up")) == sorted(routers)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in routers.items())


def test_timm_format_loads_strictly_into_the_timm_model(tmp_path):
    sd = official_pvt_state_dict(TINY, img_size=256, dge_splits=[1, 2, 4])  # rows: Φ = 4, 2, 1
    src, out = _save(sd, tmp_path, "pvt_dge_tiny.pth"), tmp_path / "pvt_tiny_dge_timm.pth"
    assert convert_pretrained.main([str(src), str(out), "--model", "pvt_tiny_dge", "--format", "timm"]) == 0
    model = timm.create_model("pvt_tiny_dge")
    model.load_state_dict(torch.load(out, weights_only=True))
    gate = model.stages[1].blocks[0].router.gate.weight  # rows: Φ = 1, 2, 4
    assert torch.equal(gate, sd["block2.0.dge.router.gate.weight"].flip(0))


def test_converter_refuses_a_checkpoint_with_unexpected_keys(tmp_path, caplog):
    sd = official_pvt_state_dict(TINY)
    sd["block1.0.attn.extra_scale"] = torch.ones(64)
    src, out = _save(sd, tmp_path, "odd.pth"), tmp_path / "odd_d2.pth"
    assert convert_pretrained.main([str(src), str(out), "--model", "pvt_tiny"]) == 1
    assert "stages.0.blocks.0.attn.extra_scale" in caplog.text and not out.exists()
    assert convert_pretrained.main([str(src), str(out), "--model", "pvt_tiny", "--allow-mismatch"]) == 0


def test_converter_command_line_runs(tmp_path):
    src, out = _save(official_pvt_state_dict(TINY), tmp_path, "pvt_tiny.pth"), tmp_path / "out.pth"
    cmd = [sys.executable, str(ROOT / "tools/convert_pretrained.py"), str(src), str(out), "--model", "pvt_tiny"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "not used by the model: head.weight" in result.stdout and out.exists()  # the dge logger: stdout, as detectron2


@pytest.mark.parametrize(
    "make_sd, model_name, message",
    [
        (lambda: timm.create_model("deit_tiny_patch16_224").state_dict(), "pvt_tiny", "this is a DeiT / ViT"),
        (lambda: official_pvt_state_dict(TINY), "deit_tiny_dge", "this is a PVT / DPVT checkpoint"),
        (lambda: official_pvt_state_dict(SMALL), "pvt_tiny", r"depths \(3, 4, 6, 3\); the model has \(2, 2, 2, 2\)"),
        (
            lambda: official_pvt_state_dict(TINY, cls_token=False, deformable=True),
            "pvt_tiny",
            "vtpack DPVT checkpoint \\('deformable' attention\\); the model uses 'sr' attention",
        ),
        (
            lambda: official_pvt_state_dict(TINY, dge_splits=[2, 1]),
            "pvt_tiny_dge",
            r"trained for granularities \(1, 2\) in regions of 2; the model has \(1, 2, 4\) in regions of 4",
        ),
        (lambda: {"layer1.0.conv1.weight": torch.zeros(1)}, "pvt_tiny", "unrecognised checkpoint layout"),
        (
            lambda: timm.create_model("deit_tiny_distilled_patch16_224").state_dict(),
            "deit_tiny_dge",
            "distilled DeiT checkpoints",
        ),
    ],
    ids=["deit_into_pvt", "pvt_into_deit", "small_into_tiny", "dpvt_into_pvt", "other_phi", "resnet", "distilled_deit"],
)
def test_checkpoint_of_another_architecture_is_rejected_clearly(make_sd, model_name, message):
    model = timm.create_model(model_name)
    convert = convert_deit_state_dict if model_name.startswith("deit") else convert_pvt_state_dict
    with pytest.raises(ValueError, match=message):
        convert(make_sd(), model)


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_timm_vit_checkpoints_convert_for_the_vitdet_backbone(tmp_path, name):
    """DeiT III and DINOv2 with registers (layer scales; patches of 14 resized to 16, its
    16×16 grid resampled to 14×14) onto the DGE ViTDet backbone: every block tensor loads,
    class and register tokens are dropped; only routers and relative positions stay initial."""
    torch.manual_seed(0)
    sd = timm.create_model(name, img_size=224).state_dict()
    src, out = _save(sd, tmp_path, "vit.pth"), tmp_path / "vitdet_d2.pth"
    config = "demo_vitdet_dge_synthetic.yaml"
    opts = ["MODEL.VIT.SIZE", "small", "MODEL.VIT.DEPTH", "12", "MODEL.VIT.GLOBAL_BLOCKS", "[2, 5, 8, 11]",
            "MODEL.VIT.LAYER_SCALE", "True"]
    assert convert_pretrained.main([str(src), str(out), "--config-file", str(ROOT / "configs" / config), *opts]) == 0
    model = _d2_model(config, *opts)
    DetectionCheckpointer(model).load(str(out))
    vit = model.backbone.bottom_up
    for key in ("attn.qkv.weight", "ls1.gamma", "mlp.fc2.bias"):
        assert torch.equal(vit.blocks[7].block.get_parameter(key), sd[f"blocks.7.{key}"])
    pos = sd["pos_embed"]
    grid = pos if name.startswith("deit3") else resample_pos_embed(pos, (16, 16), (14, 14))
    torch.testing.assert_close(vit.pos_embed.flatten(1, 2), grid)
    conversion = convert.convert_vitdet_state_dict(sd, vit)
    assert set(conversion.missing) == set(conversion.initial_routers) | set(conversion.initial)
    assert len(conversion.initial) == 2 * 12 and not conversion.unexpected  # (h, w) tables of every block
