"""Gate maps and predictions of a DGE model: colours, files and numbers."""
import json
import os

import numpy as np
import pytest
import timm
import torch

import dge
from dge.layers.calibration import randomize_routers
from dge.analysis.gates import GRANULARITY_COLORS, colorize_gates, majority_map, stage_gate_maps
from model_helpers import recorded
from train_helpers import CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
DEMO = os.path.join(CONFIGS, "demo_pvt_dge_synthetic.yaml")
SMALL = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", "MODEL.DEVICE", "cpu"]


def test_overlay_colour_counts_equal_the_routing_counts():
    gmap = np.array([[1, 2, 4], [4, 4, 0]])
    colors = colorize_gates(gmap, region_px=(16.0, 16.0), out_hw=(32, 48))
    for g in (0, 1, 2, 4):
        pixels = (colors == np.array(GRANULARITY_COLORS[g])).all(-1).sum()
        assert pixels == (gmap == g).sum() * 16 * 16
    # A map cut by the image border: the last regions cover fewer pixels, none is lost.
    colors = colorize_gates(gmap, region_px=(16.0, 16.0), out_hw=(30, 40))
    assert (colors == np.array(GRANULARITY_COLORS[0])).all(-1).sum() == 14 * 8


def test_a_plain_vit_gets_one_panel_per_block():
    """A model with one stage (a patched timm ViT) is drawn block by block, a pyramid by stage."""
    model = dge.patch(timm.create_model("vit_small_patch16_224", img_size=(80, 112), depth=3).eval())
    randomize_routers(model, seed=0)
    with torch.no_grad():
        _, record = recorded(model.forward_features, torch.randn(1, 3, 80, 112))
    panels = stage_gate_maps(model, record, (80, 112))
    assert [p["stage"] for p in panels] == ["block 0", "block 1", "block 2"]
    assert all(p["maps"].shape == (1, 1, 2, 2) and p["region_px"] == (64.0, 64.0) for p in panels)


def test_majority_map_takes_the_most_chosen_granularity_per_region():
    maps = torch.tensor([[[1, 4]], [[2, 4]], [[2, 1]]])  # three blocks, 1×2 regions
    assert majority_map(maps).tolist() == [[2, 4]]


def test_visualize_gates_writes_a_figure_and_the_numbers_per_image(tmp_path):
    from visualize_gates import main

    out = tmp_path / "gates"
    summary = main(["--config-file", DEMO, "--input", "skimage:chelsea", "skimage:coffee", "--output", str(out), *SMALL])
    assert sorted(summary) == ["chelsea", "coffee"]
    for name, row in summary.items():
        assert os.path.getsize(out / f"{name}_gates.png") > 1000
        assert 0.0 < row["beta"] <= 1.01
        assert len(row["query_ratio_per_stage"]) == 4
        assert abs(sum(row[f"share_phi{g}"] for g in (1, 2, 4)) - 1.0) < 1e-6
    assert json.load(open(out / "gates.json")).keys() == summary.keys()


def test_predict_writes_visualised_predictions(tmp_path):
    from predict import main

    from dge.config import load_config
    from dge.detectron2.data import iter_images
    from dge.detectron2.engine import Predictor

    out = tmp_path / "pred"
    threshold = 0.1  # an untrained model scores its detections near 1/(classes + 1)
    torch.manual_seed(0)  # the same random initialisation for the tool and the check below
    summary = main(["--config-file", DEMO, "--input", "skimage:rocket", "--output", str(out),
                    "--confidence-threshold", str(threshold), *SMALL])
    assert os.path.getsize(out / "rocket_pred.jpg") > 1000
    cfg = load_config(DEMO, SMALL)
    torch.manual_seed(0)
    predictor = Predictor(cfg)
    _, bgr = next(iter_images(["skimage:rocket"]))
    expected = predictor(bgr)
    kept = int((expected["instances"].scores >= threshold).sum())
    assert kept > 0 and summary["rocket"]["num_detections"] == kept
    assert summary["rocket"]["beta"] == pytest.approx(float(expected["dge"]["beta"]), abs=1e-6)
