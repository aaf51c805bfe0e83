"""A whole detectron2 DGE model exported as detectron2's deploy tool does (``dge.detectron2.export``:
TracingAdapter + TorchScript) keeps its routing; detectron2's activation count takes it."""
import pytest
import torch

from repo import ROOT


def test_the_demo_mask_rcnn_through_detectron2s_tracing_path(tmp_path, one_thread):
    """A whole DGE Mask R-CNN traced with detectron2's TracingAdapter (as its deploy tool)
    gives the eager model's boxes, scores and masks on images it was not traced with."""
    import export_model

    tiny = [
        "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "20", "MODEL.ROI_BOX_HEAD.FC_DIM", "32",
        "MODEL.ROI_MASK_HEAD.CONV_DIM", "16", "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5",
    ]
    result = export_model.main(
        ["--config-file", str(ROOT / "configs" / "demo_pvt_dge_synthetic.yaml"), "--format", "torchscript",
         "--input-size", "96", "128", "--random-routers", "0.5", "--output", str(tmp_path),
         "--check", "skimage:chelsea", "skimage:coffee", "skimage:rocket", "--", *tiny]
    )
    assert not result["failed"]
    checks = result["checks"]
    assert len(checks) == 3 and all(c["detections_eager"] == c["detections_exported"] == 5 for c in checks)
    assert max(c["max_abs_diff"] for c in checks) < 1e-3
    assert sum(c["mask_pixels_differing"] for c in checks) <= 1e-5 * sum(c["mask_pixels"] for c in checks)
    assert all(c["beta_eager"] == pytest.approx(c["beta_exported"], abs=1e-6) for c in checks)
    assert len({round(c["beta_eager"], 6) for c in checks}) == 3  # three routings


def test_detectron2_activation_count_takes_a_dge_model():
    """detectron2's analyze_model --tasks activation (activation_count_operators) traces the
    model's outputs, the DGE statistics included."""
    from detectron2.modeling import build_model
    from detectron2.utils.analysis import activation_count_operators

    from dge.config import load_config

    cfg = load_config(str(ROOT / "configs" / "demo_pvt_dge_synthetic.yaml"), ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    counts = activation_count_operators(model, [{"image": torch.rand(3, 64, 96) * 255}])
    assert counts["conv"] > 0 and counts["linear"] > 0
