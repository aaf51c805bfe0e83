"""Exported DGE models keep their dynamic routing: torch.export, ONNX (onnxruntime) and
TorchScript (detectron2's tracing path) against the eager model on inputs other than the
one they were exported with."""
from pathlib import Path

import pytest
import torch

from dge.analysis.calibration import randomize_routers
from dge.analysis.export_checks import swap_check
from dge.export import ExportedModel, ExportError, RoutedOutputs, export_module, max_difference
from dge.layers import dge_modules
from dge.modeling.backbone import PyramidVisionTransformer
from model_helpers import recorded

ROOT = Path(__file__).resolve().parents[1]
HW = (64, 96)


def tiny_dge_pyramid(attention: str = "sr", global_pool: str = "avg") -> RoutedOutputs:
    """One block per stage, routers that route by content (regions differ per input)."""
    torch.manual_seed(0)
    model = PyramidVisionTransformer(
        img_size=64, num_classes=10, global_pool=global_pool, depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256),
        attention=attention, dge=True,
    ).eval()
    randomize_routers(model, seed=1)
    for m in dge_modules(model):
        torch.nn.init.zeros_(m.router.gate.bias)
    return RoutedOutputs(model).eval()


def inputs(n: int):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(1, 3, *HW, generator=gen) * (0.5 + i) for i in range(n)]


def query_counts(record) -> list:
    return [int(info.num_queries.sum()) for info in record.infos]


@pytest.mark.parametrize("attention, global_pool", [("sr", "avg"), ("deformable", "avg"), ("sr", "token")])
@pytest.mark.parametrize("fmt", ["exported", "onnx", "torchscript"])
def test_an_exported_model_follows_each_inputs_routing(tmp_path, fmt, attention, global_pool):
    if fmt == "onnx":  # requirements.txt installs both; a platform without their wheels skips
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
        pytest.importorskip("onnxruntime", reason="running ONNX files needs onnxruntime")
    model = tiny_dge_pyramid(attention, global_pool)
    export_image, *others = inputs(4)
    path = str(tmp_path / f"model.{fmt}")
    meta = export_module(model, export_image, path, fmt)
    assert meta["outputs"][0] == "output" and "dge.beta" in meta["outputs"]
    exported = ExportedModel(path)
    routings = set()
    for x in [export_image] + others:
        with torch.no_grad():
            eager, record = recorded(model, x)
        routings.add(tuple(query_counts(record)))
        out = exported(x)
        assert list(out) == list(eager)
        assert max_difference(eager, out) < 1e-4
        assert float(out["dge.beta"][0]) == pytest.approx(float(eager["dge.beta"][0]), abs=1e-6)
    assert len(routings) == 4  # every input routed differently, none like the export image


def test_exported_under_all_fine_routing_runs_mixed_routing_and_the_reverse():
    """The graph does not keep the routing it was traced with: traced with every region at
    φ = 1 and run with routers that mix granularities (their weights loaded into the same
    program), and the other way round (``tools/export_model.py --swap-check``)."""
    model = tiny_dge_pyramid()
    example, *others = inputs(3)
    rows = swap_check(model, example, others)
    assert [r["case"] for r in rows] == ["traced all-fine, run as routed", "traced as routed, run all-fine"]
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert max(rows[0]["betas"]) < 0.95 and min(rows[1]["betas"]) >= 1.0  # mixed, then all φ = 1 (+ routers)
    with torch.no_grad():  # the model keeps its own routers
        assert float(model(example)["dge.share_phi1"][0]) < 0.95


def test_an_input_of_another_size_is_refused_with_the_size_the_export_takes(tmp_path):
    model = tiny_dge_pyramid()
    path = str(tmp_path / "model.pt2")
    export_module(model, inputs(1)[0], path, "exported")
    with pytest.raises(ValueError, match=r"exported for inputs of shape \[1, 3, 64, 96\].*got \[1, 3, 96, 96\]"):
        ExportedModel(path)(torch.randn(1, 3, 96, 96))


def test_an_export_that_stops_names_the_module_and_the_line(tmp_path):
    class HostDecision(torch.nn.Module):
        def forward(self, x):
            if x.mean() > 0:  # a Python branch on a tensor's value
                return x * 2
            return x

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), HostDecision())
    with pytest.raises(ExportError, match=r"exported export stopped in module 'model.1' \(HostDecision\) at .*test_export.py:\d+ `if x.mean\(\) > 0:"):
        export_module(RoutedOutputs(model), torch.randn(1, 3, 8, 8), str(tmp_path / "m.pt2"), "exported")


def test_a_batch_cannot_be_exported_with_dge_blocks(tmp_path):
    model = tiny_dge_pyramid()
    with pytest.raises(ValueError, match="batch 1"):
        export_module(model, torch.randn(2, 3, *HW), str(tmp_path / "m.pt2"), "exported")
    with pytest.raises(RuntimeError, match="batch 1 only"):
        torch.jit.trace(model.model, torch.randn(2, 3, *HW), check_trace=False)


def test_skipping_granularity_without_extra_tokens_is_refused_with_a_reason(tmp_path):
    torch.manual_seed(0)
    model = PyramidVisionTransformer(
        img_size=64, num_classes=0, global_pool="avg", depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256),
        dge=dict(granularities=(0, 1, 2, 4)),
    ).eval()
    with pytest.raises(ExportError, match=r"DynamicGrainedEncoder.*0 in its granularities \(0, 1, 2, 4\).*keep no query"):
        export_module(RoutedOutputs(model), inputs(1)[0], str(tmp_path / "m.pt2"), "exported")


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
