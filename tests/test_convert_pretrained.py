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
from pathlib import Path

import pytest
import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torch.nn import functional as F

from dge.config import add_dge_config
from dge.modeling.backbone import convert
from dge.modeling.backbone.convert import convert_deit_state_dict
from dge.modeling.backbone.convert import convert_pvt_state_dict
from dge.modeling.backbone.utils import resample_pos_embed
from model_helpers import recorded

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import convert_pretrained  # noqa: E402

DIMS, HEADS, MLP, SR, PATCH = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1), (4, 2, 2, 2)
SMALL, TINY = (3, 4, 6, 3), (2, 2, 2, 2)
POINTS = 4


# ------------------------------------------------------------------ official layouts
def official_pvt_state_dict(depths, img_size=224, cls_token=True, deformable=False, dge_splits=None, seed=0):
    """Keys and shapes of whai362/PVT v1 ``PyramidVisionTransformer`` (vtpack's DPVT with
    ``deformable``: attn.v / attn_weight / offsets and no class token; vtpack's PVT+DGE with
    ``dge_splits``: ``block{s}.{j}.dge.router.gate`` and ``dge.splits``), random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    def linear(p, fan_in, fan_out, scale=1.0):
        sd[p + ".weight"] = rnd(fan_out, fan_in, scale=scale * fan_in**-0.5)
        sd[p + ".bias"] = rnd(fan_out, scale=0.1)

    def norm(p, c):
        sd[p + ".weight"] = 1.0 + rnd(c, scale=0.1)
        sd[p + ".bias"] = rnd(c, scale=0.1)

    prev, stride = 3, 1
    for i, depth in enumerate(depths):
        s, c, p = i + 1, DIMS[i], PATCH[i]
        stride *= p
        sd[f"patch_embed{s}.proj.weight"] = rnd(c, prev, p, p, scale=(prev * p * p) ** -0.5)
        sd[f"patch_embed{s}.proj.bias"] = rnd(c, scale=0.1)
        norm(f"patch_embed{s}.norm", c)
        sd[f"pos_embed{s}"] = rnd(1, (img_size // stride) ** 2 + (cls_token and i == 3), c, scale=0.5)
        for j in range(depth):
            b = f"block{s}.{j}"
            norm(b + ".norm1", c)
            if deformable:
                linear(b + ".attn.v", c, c)
                linear(b + ".attn.attn_weight", c, HEADS[i] * POINTS)
                linear(b + ".attn.offsets", c, HEADS[i] * POINTS * 2, scale=2.0)
            else:
                linear(b + ".attn.q", c, c)
                linear(b + ".attn.kv", c, 2 * c)
                if SR[i] > 1:
                    sd[b + ".attn.sr.weight"] = rnd(c, c, SR[i], SR[i], scale=(c * SR[i] ** 2) ** -0.5)
                    sd[b + ".attn.sr.bias"] = rnd(c, scale=0.1)
                    norm(b + ".attn.norm", c)
            linear(b + ".attn.proj", c, c)
            norm(b + ".norm2", c)
            linear(b + ".mlp.fc1", c, c * MLP[i])
            linear(b + ".mlp.fc2", c * MLP[i], c)
            if dge_splits:
                sd[b + ".dge.splits"] = torch.tensor(dge_splits)
                linear(b + ".dge.router.gate", c, len(dge_splits), scale=4.0)
        prev = c
    norm("norm", DIMS[3])
    if cls_token:
        sd["cls_token"] = rnd(1, 1, DIMS[3], scale=0.5)
    linear("head", DIMS[3], 1000)
    return sd


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _mlp(x, sd, p):
    return _lin(F.gelu(_lin(x, sd, p + ".fc1")), sd, p + ".fc2")


def official_sr_attention(sd, p, queries, context, hw, heads, sr):
    """PVT v1 ``Attention.forward``: q from ``queries``, k / v from the (R×R conv + LayerNorm
    reduced) ``context``; explicit softmax(q·kᵀ·d^-½)·v."""
    b, m, c = queries.shape
    d = c // heads
    q = _lin(queries, sd, p + ".q").reshape(b, m, heads, d).permute(0, 2, 1, 3)
    x = context
    if sr > 1:
        x = x.permute(0, 2, 1).reshape(b, c, *hw)
        x = F.conv2d(x, sd[p + ".sr.weight"], sd[p + ".sr.bias"], stride=sr).reshape(b, c, -1).permute(0, 2, 1)
        x = _ln(x, sd, p + ".norm", 1e-5)
    kv = _lin(x, sd, p + ".kv").reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
    return _lin((attn @ kv[1]).transpose(1, 2).reshape(b, m, c), sd, p + ".proj")


def official_deformable_attention(sd, p, x, hw, heads):
    """vtpack DPVT ``Attention.forward`` and its CUDA sampler: token (i, j) samples at
    (j, i) + offset in pixel units, bilinearly, zeros outside the map."""
    b, n, c = x.shape
    h, w = hw
    d = c // heads
    value = _lin(x, sd, p + ".v").reshape(b, n, heads, d).permute(0, 2, 1, 3)  # [b, heads, n, d]
    offsets = _lin(x, sd, p + ".offsets").reshape(b, n, heads, POINTS, 2).permute(0, 2, 1, 3, 4)
    weights = _lin(x, sd, p + ".attn_weight").reshape(b, n, heads, POINTS).permute(0, 2, 1, 3).softmax(-1)
    ii, jj = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    loc = torch.stack([jj, ii], dim=-1).reshape(1, 1, n, 1, 2) + offsets  # (x, y)
    x0, y0 = loc[..., 0].floor(), loc[..., 1].floor()
    tx, ty = loc[..., 0] - x0, loc[..., 1] - y0
    out = torch.zeros(b, heads, n, d, dtype=x.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            wgt = (tx if dx else 1 - tx) * (ty if dy else 1 - ty) * weights
            inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().reshape(b, heads, n * POINTS)
            taps = value.gather(2, idx[..., None].expand(-1, -1, -1, d)).reshape(b, heads, n, POINTS, d)
            out += ((wgt * inside)[..., None] * taps).sum(dim=3)
    return _lin(out.permute(0, 2, 1, 3).reshape(b, n, c), sd, p + ".proj")


def official_block(sd, p, x, hw, stage, deformable):
    y = _ln(x, sd, p + ".norm1", 1e-6)
    if deformable:
        x = x + official_deformable_attention(sd, p + ".attn", y, hw, HEADS[stage])
    else:
        x = x + official_sr_attention(sd, p + ".attn", y, y, hw, HEADS[stage], SR[stage])
    return x + _mlp(_ln(x, sd, p + ".norm2", 1e-6), sd, p + ".mlp")


def vtpack_dge_block(sd, p, x, hw, stage, extra, choices):
    """vtpack ``pvt_dge`` Block at inference: per S×S region the router (a Linear on the
    region's average, before norm1) picks split k; the k×k patch means and the extra tokens are
    the queries of the block against the dense tokens; each token gets its patch's update."""
    b, n, c = x.shape
    h, w = hw
    splits = sd[p + ".dge.splits"].tolist()
    s = max(splits)
    spatial = x[:, extra:].reshape(b, h, w, c)
    region_means = F.avg_pool2d(spatial.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
    choice = _lin(region_means, sd, p + ".dge.router.gate").argmax(-1)
    choices.append(choice)
    out = x.clone()
    for bi in range(b):
        queries, plan = [x[bi, :extra]], []
        for ri in range(h // s):
            for rj in range(w // s):
                k = splits[choice[bi, ri, rj]]
                region = spatial[bi, ri * s : (ri + 1) * s, rj * s : (rj + 1) * s]
                queries.append(region.reshape(k, s // k, k, s // k, c).mean(dim=(1, 3)).reshape(k * k, c))
                plan.append((ri, rj, k))
        q = torch.cat(queries)[None]
        ctx = _ln(x[bi : bi + 1], sd, p + ".norm1", 1e-6)
        y = q + official_sr_attention(sd, p + ".attn", _ln(q, sd, p + ".norm1", 1e-6), ctx, hw, HEADS[stage], SR[stage])
        y = y + _mlp(_ln(y, sd, p + ".norm2", 1e-6), sd, p + ".mlp")
        delta = (y - q)[0]
        out[bi, :extra] += delta[:extra]
        grid = out[bi, extra:].view(h, w, c)
        row = extra
        for ri, rj, k in plan:
            patch = delta[row : row + k * k].reshape(k, 1, k, 1, c).expand(k, s // k, k, s // k, c)
            grid[ri * s : (ri + 1) * s, rj * s : (rj + 1) * s] += patch.reshape(s, s, c)
            row += k * k
    return out


def official_pvt_forward(sd, x, depths, img_size, classify, deformable=False, choices=None):
    """whai362/PVT v1 (vtpack's DPVT / PVT+DGE for ``deformable`` / ``dge.splits`` keys):
    ``classify``: the classification model -> logits; else the detection backbone
    (``detection/pvt.py``: no class token, ``pos_embed4[:, 1:]``, no final norm) -> [res2..res5]."""
    b = x.shape[0]
    with_cls = classify and "cls_token" in sd
    num_patches1 = (img_size // 4) ** 2
    outs = []
    for i, depth in enumerate(depths):
        s, c = i + 1, DIMS[i]
        x = F.conv2d(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], stride=PATCH[i])
        h, w = x.shape[-2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{s}.norm", 1e-5)
        grid = img_size // (4 * 2**i)
        pos = sd[f"pos_embed{s}"]
        extra_pos = pos.shape[1] - grid * grid
        spatial_pos = pos[:, extra_pos:]
        if h * w != num_patches1:  # the official `_get_pos_embed` test (against patch_embed1, in every stage)
            spatial_pos = spatial_pos.reshape(1, grid, grid, c).permute(0, 3, 1, 2)
            spatial_pos = F.interpolate(spatial_pos, size=(h, w), mode="bilinear").reshape(1, c, h * w).permute(0, 2, 1)
        extra = 1 if with_cls and i == 3 else 0
        if extra:
            x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
            spatial_pos = torch.cat([pos[:, :1], spatial_pos], dim=1)
        x = x + spatial_pos
        for j in range(depth):
            p = f"block{s}.{j}"
            if p + ".dge.splits" in sd:
                x = vtpack_dge_block(sd, p, x, (h, w), i, extra, choices)
            else:
                x = official_block(sd, p, x, (h, w), i, deformable)
        outs.append(x[:, extra:].transpose(1, 2).reshape(b, c, h, w))
        if i < 3:
            x = outs[-1]
    if not classify:
        return outs
    x = _ln(x, sd, "norm", 1e-6)
    return _lin(x[:, 0] if with_cls else x.mean(dim=1), sd, "head")


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
