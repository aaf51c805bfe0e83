"""tools/benchmark.py: router calibration reaches the target β, and the report says what ran."""
import copy
import json
import os

import pytest
import timm
import torch
from model_helpers import TimmCase, recorded

import benchmark
import dge
from dge.analysis.timm_benchmark import routing_free
from dge.layers import force_granularity
from repo import ROOT

CONFIG = os.path.join(ROOT, "configs", "demo_pvt_dge_synthetic.yaml")


@pytest.mark.parametrize("calibration", ["shared", "per-block"])
def test_calibration_reaches_the_target_beta_and_the_report_is_complete(calibration, tmp_path, one_thread):
    out = tmp_path / "bench.json"
    argv = ["--config-file", CONFIG, "--sizes", "256x320", "--runs", "1", "--warmup", "0"]
    argv += ["--calibration", calibration, "--target-beta", "0.5", "--json", str(out)]
    argv += ["--memory"] if calibration == "shared" else ["--batch", "2"]
    benchmark.main(argv)
    result = json.loads(out.read_text())
    assert calibration in result["routers"] and result["threads"] == 1
    (case,) = result["cases"]
    assert abs(case["beta"] - 0.5) < 0.03
    per_image = case["beta_per_image"]  # β of the batch is the mean of its images'
    assert len(per_image) == case["batch"] and sum(per_image) / len(per_image) == pytest.approx(case["beta"], abs=1e-3)
    per_block, offsets = case["beta_per_block"], case["calibrated_logit_offsets"]
    if calibration == "per-block":
        assert len(offsets) == len(per_block) == 8  # PVT-tiny: 2 blocks per stage
        # Stage 1 (64×80 tokens, 320 regions) can be steered finely: each block lands at γ.
        assert all(abs(b - 0.5) < 0.03 for b in per_block[:2])
    else:
        assert len(offsets) == 1
    row = case["backbone"]
    assert row["vanilla"]["median_ms"] > 0 and row["dge"]["median_ms"] > 0
    assert row["ratio"] == pytest.approx(row["dge"]["median_ms"] / row["vanilla"]["median_ms"], abs=1e-3)
    if calibration == "shared":  # each variant's forward measured in its own process
        for variant in ("vanilla", "dge"):
            assert 0 < row[variant]["rss_increase_mb"] < row[variant]["peak_rss_mb"]


def test_repeats_in_fresh_processes_and_summarises_each_ratio(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config-file", CONFIG, "--sizes", "128x160", "--runs", "1", "--warmup", "0", "--processes", "2"]
    benchmark.main(argv + ["--json", str(out), "MODEL.DGE.GUMBEL_TAU", "1.0"])  # overrides pass through
    summary = json.loads(out.read_text())
    assert summary["processes"] == 2 and len(summary["per_process"]) == 2
    (case,) = summary["cases"]
    row = case["backbone"]
    each = [run["cases"][0]["backbone"]["ratio"] for run in summary["per_process"]]
    assert row["ratios"] == each and len(row["dge_median_ms"]) == 2
    assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert row["ratio_median"] == pytest.approx(sum(each) / 2, abs=1e-4)


def test_several_runtimes_are_measured_interleaved_with_each_ops(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    argv = ["--config-file", CONFIG, "--sizes", "128x160", "--runs", "1", "--warmup", "0", "--op-profile"]
    benchmark.main(argv + ["--json", str(out), "--runtime", "eager", "onnxruntime", "MODEL.DGE.GUMBEL_TAU", "1.0"])
    (case,) = json.loads(out.read_text())["cases"]
    assert (case["backbone"]["runtime"], case["backbone@onnxruntime"]["runtime"]) == ("eager", "onnxruntime")
    for variant in ("vanilla", "dge"):
        assert case["backbone@onnxruntime"][variant]["max_abs_diff_to_eager"] < 1e-4
        assert "addmm" in case["backbone"][variant]["ops_ms"]  # torch's profile: aten ops
        assert "MultiHeadAttention" in case["backbone@onnxruntime"][variant]["ops_ms"]  # ONNX Runtime's: its ops
    with pytest.raises(SystemExit):
        benchmark.main(argv + ["--runtime", "onnx"])  # not a runtime, not a config key


def test_a_timm_model_against_itself_patched(one_thread):
    results = benchmark.main(
        ["--timm-model", "vit_small_patch16_224", "--sizes", "64x96", "--batch", "1", "2", "--runs", "1", "--warmup", "0"]
    )
    assert [(c["size"], c["batch"]) for c in results["cases"]] == [([64, 96], 1), ([64, 96], 2)]
    for case in results["cases"]:
        assert 0.3 <= case["beta"] <= 0.7
        assert case["dge"]["median_ms"] > 0 and case["ratio"] == pytest.approx(
            case["dge"]["median_ms"] / case["vanilla"]["median_ms"], rel=1e-3
        )
        assert case["routing_free"]["median_ms"] > 0 and 0 < case["routing_free_ratio"]


def test_routing_free_runs_the_recorded_query_counts_and_leaves_the_model_alone():
    torch.manual_seed(0)
    vanilla = timm.create_model("vit_tiny_patch16_224", img_size=(64, 128), num_classes=0, depth=3).eval()
    patched = dge.patch(copy.deepcopy(vanilla))
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        with force_granularity(patched, 1):  # every token a query: the vanilla blocks
            _, record = recorded(patched.forward_features, x)
        with routing_free(patched, record):
            assert torch.allclose(patched.forward_features(x), vanilla.forward_features(x), atol=1e-5)
        with force_granularity(patched, 4):  # 4×8 tokens, two 4×4 patches: 2 queries, the class token
            _, record = recorded(patched.forward_features, x)
        hidden = torch.randn(2, 1 + 32, 192)
        with routing_free(patched, record):
            assert [b.forward.m for b in patched.blocks] == [3, 3, 3]
            out = patched.blocks[0](hidden)  # the 3 leading tokens updated, the others passed through
        assert torch.equal(out[:, 3:], hidden[:, 3:]) and not torch.allclose(out[:, :3], hidden[:, :3])
        assert "forward" not in vars(patched.blocks[0])  # the patched model is as it was
        assert torch.equal(patched.blocks[0](hidden), patched.blocks[0](hidden))


KINDS = {  # windows (SAM, Swin's rolled maps), a map's convolution (PVT v2), unrolled tokens (Hiera)
    "sam": TimmCase("samvit_base_patch16", dict(img_size=(176, 240), window_size=4, depth=2, global_attn_indexes=[1],
                                                embed_dim=64, num_heads=2), (176, 240)),
    "swin": TimmCase("swin_tiny_patch4_window7_224", dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), window_size=8,
                                                          img_size=(76, 84)), (76, 84)),
    "pvt_v2": TimmCase("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    "hiera": TimmCase("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1), img_size=(128, 128)),
                      (128, 128)),
}


@pytest.mark.parametrize("case", sorted(KINDS))
def test_routing_free_is_the_untouched_model_at_all_fine_routing_for_every_kind_of_block(case):
    model, x = KINDS[case].build()
    with torch.no_grad():
        reference = model.forward_features(x)
        dge.patch(model)
        with force_granularity(model, 1):
            _, record = recorded(model.forward_features, x)
        with routing_free(model, record):
            assert torch.allclose(model.forward_features(x), reference, atol=1e-5)
