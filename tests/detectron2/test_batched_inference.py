"""A batch of images with different routings gives each image the outputs it gets alone."""
import math

import pytest
import torch
from detectron2.layers import ShapeSpec

from dge.config import load_config
from dge.layers import dge_modules
from dge.detectron2 import build_pvt_backbone
from train_helpers import CONFIGS
from model_helpers import recorded

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("attention", ["sr", "deformable"])
def test_batched_backbone_outputs_equal_batch_one(attention):
    cfg = load_config(f"{CONFIGS}/mask_rcnn_pvt_t_dge_1x.yaml", ["MODEL.PVT.ATTENTION", attention])
    torch.manual_seed(0)
    backbone = build_pvt_backbone(cfg, ShapeSpec(channels=3)).eval()
    with torch.no_grad():  # routers that tell regions apart, centred on a mix of choices
        for m in dge_modules(backbone):
            m.router.gate.weight.normal_(std=3.0 / math.sqrt(m.router.gate.in_features))
            m.router.gate.bias.zero_()
    images = torch.randn(3, 3, 96, 160)
    images[1, :, :, 80:] = 0.0  # a flat half: different routing from the others
    images[2] *= 0.2
    with torch.no_grad():
        batched, record = recorded(backbone, images)
        counts = [info.num_queries.tolist() for info in record.infos]
        alone = [backbone(images[i : i + 1]) for i in range(3)]
    assert any(len(set(c)) > 1 for c in counts)  # the images really route differently
    for i in range(3):
        for name, feat in batched.items():
            assert (feat[i] - alone[i][name][0]).abs().max() < 1e-4, (i, name)
