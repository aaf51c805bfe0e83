"""The plain-ViT detector (ViTDet's design) in detectron2: the backbone and simple feature
pyramid the configs describe, DGE blocks through dge.patch, and a Mask R-CNN training step
with the budget loss on the built-in data."""
import pytest
import torch
from detectron2.modeling import build_model

from dge.config import load_config
from dge.layers import dge_modules
from train_helpers import one_training_step

DEMO = "configs/demo_vitdet_dge_synthetic.yaml"


def test_configs_build_the_vit_and_its_pyramid():
    cfg = load_config("configs/mask_rcnn_vitdet_b_1x.yaml")
    model = build_model(cfg)
    vit = model.backbone.bottom_up
    assert (vit.embed_dim, len(vit.blocks)) == (768, 12) and not dge_modules(model)
    assert [b.window_size for b in vit.blocks] == [14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 14, 0]
    shapes = model.backbone.output_shape()
    assert {n: s.stride for n, s in shapes.items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    assert {s.channels for s in shapes.values()} == {256}
    dge_cfg = load_config("configs/mask_rcnn_vitdet_b_dge_1x.yaml")
    assert len(dge_modules(build_model(dge_cfg).backbone)) == 12


def test_pyramid_levels_have_the_detectron2_sizes():
    cfg = load_config(DEMO)
    backbone = build_model(cfg).backbone.eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 160, 224))
    assert {n: tuple(t.shape[-2:]) for n, t in out.items()} == {
        "p2": (40, 56), "p3": (20, 28), "p4": (10, 14), "p5": (5, 7), "p6": (3, 4)}


@pytest.mark.parametrize("opts, message", [
    (["MODEL.VIT.SIZE", "gigantic"], "MODEL.VIT.SIZE must be one of"),
    (["MODEL.VIT.GLOBAL_BLOCKS", [2, 6]], "must index blocks 0..5"),
    (["MODEL.VIT.WINDOW_SIZE", 6], "region size 4 does not divide block 0's window 6x6"),
])
def test_bad_vit_configs_are_rejected_with_a_clear_error(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(load_config(DEMO, opts))


def test_a_training_step_routes_every_block_and_reaches_every_parameter(data_root):
    cfg = load_config(DEMO, ["DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2])
    losses, record, unused = one_training_step(cfg)
    assert "loss_budget" in losses and len(record.infos) == 6 and unused == []
