"""The redundancy analysis of Sec. 3.1 (Fig. 2: the 2×2-patch Pearson statistic, replacing
redundant tokens by their patch mean): ``dge.analysis.redundancy`` and tools/analyze_redundancy.py
on tiny inputs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import resolve_data_config

from dge.analysis.redundancy import (
    RedundancyProbe,
    count_queries,
    patch_correlation,
    pearson,
    replace_by_patch_mean,
    split_patches,
)
from dge.classification import build_dataset, build_model, build_transforms
from repo import load_tool, read_csv


@pytest.fixture(scope="module")
def redundancy_tool():
    return load_tool("analyze_redundancy")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_deit(num_classes=2, seed=0):
    """DeiT-Ti at 64×64: a 4×4 token map (four 2×2 patches) and a class token."""
    torch.manual_seed(seed)
    return build_model("deit_tiny_vanilla", num_classes, 64, drop_path=0.0).eval()


# ------------------------------------------------------------------ the statistic
def test_each_token_identical_to_its_patch_mean_has_coefficient_one():
    # One random vector per 2×2 patch, repeated over the patch: every token equals its patch
    # mean, while neighbouring patches differ (a wrong grouping would mix them).
    per_patch = torch.randn(2, 3, 4, 32)  # [B, h/2, w/2, C]
    grid = per_patch.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # [B, 6, 8, C]
    coef = patch_correlation(grid.reshape(2, 48, 32), (6, 8))
    assert coef.shape == (2, 3, 4, 4)
    torch.testing.assert_close(coef, torch.ones_like(coef), atol=1e-5, rtol=0)
    # ... and one token moved to the neighbouring patch's vector is no longer at 1.
    grid[0, 0, 1] = per_patch[0, 0, 1]
    coef = patch_correlation(grid.reshape(2, 48, 32), (6, 8))
    assert coef[0, 0, 0, 1] < 0.9 and coef[0, 0, 1].min() > 1 - 1e-5


def test_the_coefficient_is_pearsons_centred_and_scale_free():
    torch.manual_seed(0)
    x, y = torch.randn(5, 64), torch.randn(5, 64)
    torch.testing.assert_close(pearson(x, 3 * x + 5), torch.ones(5))
    torch.testing.assert_close(pearson(x, -x + 1), -torch.ones(5))
    expected = [np.corrcoef(a, b)[0, 1] for a, b in zip(x.numpy(), y.numpy())]
    torch.testing.assert_close(pearson(x + 10, 2 * y - 7), torch.tensor(expected, dtype=torch.float32))
    assert pearson(torch.ones(64), x[0]).item() == 0.0  # a constant token: 0 by convention


def test_four_independent_noise_tokens_correlate_one_half_with_their_mean():
    # corr(x_i, (x_1 + ... + x_4) / 4) = (σ²/4) / (σ · σ/2) = 1/√4 = 0.5 for i.i.d. tokens.
    torch.manual_seed(0)
    coef = patch_correlation(torch.randn(4, 16 * 16, 512), (16, 16))  # 1024 coefficients
    assert abs(coef.mean().item() - 0.5) < 0.01
    assert coef.std().item() < 0.05  # each one is near 0.5, not only their mean
    # a token correlated with a common pattern shared by the patch rises above it
    shared = torch.randn(4, 8, 8, 1, 512)
    noisy = split_patches(torch.randn(4, 256, 512), (16, 16)) + 2 * shared
    tokens = noisy.reshape(4, 8, 8, 2, 2, 512).permute(0, 1, 3, 2, 4, 5).reshape(4, 256, 512)
    assert patch_correlation(tokens, (16, 16)).mean() > 0.9


def test_patch_mean_replacement_and_query_count_follow_the_rule():
    torch.manual_seed(0)
    tokens = torch.randn(1, 5 * 5, 8)  # odd map: 2×2 patches plus a last row and column
    mask = torch.zeros(1, 2, 2, 4, dtype=torch.bool)
    mask[0, 0, 0] = True  # all four tokens of the first patch
    mask[0, 0, 1, :2] = True  # two tokens of the second
    mask[0, 1, 0, 0] = True  # one token of the third
    out = replace_by_patch_mean(tokens, (5, 5), mask)
    grid, new = tokens.reshape(5, 5, 8), out.reshape(5, 5, 8)
    mean = grid[:2, :2].reshape(4, 8).mean(0)
    torch.testing.assert_close(new[:2, :2], mean.expand(2, 2, 8))
    second = grid[:2, 2:4].reshape(4, 8).mean(0)
    torch.testing.assert_close(new[0, 2:4], second.expand(2, 8))  # top-left, top-right replaced
    torch.testing.assert_close(new[1, 2:4], grid[1, 2:4])  # bottom pair kept
    torch.testing.assert_close(new[4], grid[4])
    torch.testing.assert_close(new[:, 4], grid[:, 4])
    # 1 + (2 + 1) + (3 + 1) + 4 queries for the patches, 9 for the odd row and column
    assert count_queries(mask, (5, 5)).tolist() == [1 + 3 + 4 + 4 + 9]
    assert count_queries(torch.zeros_like(mask), (5, 5)).tolist() == [25]


def test_replacement_keeps_every_query_above_one_and_merges_patches_at_low_thresholds():
    model = tiny_deit()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        vanilla = model(images)
        with RedundancyProbe(model, threshold=1.5) as probe:
            kept = model(images)
        above_one = probe.stats()
        with RedundancyProbe(model, threshold=-2.0) as probe:
            merged = model(images)
        all_merged = probe.stats()
    assert above_one.query_ratio == 1.0 and above_one.flops_ratio == pytest.approx(1.0)
    torch.testing.assert_close(kept, vanilla, atol=0, rtol=0)
    # every patch merged: 1 query for 4 tokens in each of the 12 blocks
    assert all_merged.query_ratio == 0.25 and 0.25 < all_merged.flops_ratio < 1.0
    assert not torch.allclose(merged, vanilla)
    # after block 1 merged its queries, the four tokens of a patch are equal: coefficient 1
    assert all_merged.layer_mean[0] < 0.99 and all_merged.layer_mean[1] == pytest.approx(1.0, abs=1e-4)


def test_redundancy_probe_refuses_dge_models():
    torch.manual_seed(0)
    model = build_model("deit_tiny_dge", 2, 64, drop_path=0.0, dge={})
    with pytest.raises(ValueError, match="needs a vanilla model"):
        RedundancyProbe(model)


# ------------------------------------------------------------------ tools/analyze_redundancy.py
def write_image_folder(root, classes=("cat", "dog"), per_class=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = os.path.join(root, "val", name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 60 + 120 * c) + rng.normal(0, 30, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def test_redundancy_tool_draws_fig2_and_the_accuracy_curve_of_a_labelled_folder(redundancy_tool, tmp_path):
    data = write_image_folder(tmp_path / "data")
    model = tiny_deit(seed=1)
    torch.save({"model": model.state_dict(), "classes": ["cat", "dog"]}, tmp_path / "weights.pth")
    out = tmp_path / "out"
    result = redundancy_tool.main([
        "--model", "deit_tiny_vanilla", "--weights", str(tmp_path / "weights.pth"), "--data-path", data,
        "--input-size", "64", "--batch-size", "3", "--thresholds", "1.5", "0.5", "-2", "--bins", "20",
        "--output", str(out),
    ])
    for name in ("correlation_histogram.png", "correlation_histogram_per_layer.png",
                 "correlation_variance_per_layer.png", "accuracy_vs_complexity.png"):
        assert (out / name).stat().st_size > 5000, name
    saved = json.loads((out / "redundancy.json").read_text())
    assert saved["weights"].endswith("weights.pth") and not saved["random_init"] and saved["num_images"] == 4
    stats = saved["statistics"]
    assert len(stats["layers"]) == 12 and len(stats["bin_edges"]) == 21
    # 4 images × 16 tokens per block, every token counted once
    assert all(sum(layer["histogram"]) == 64 for layer in stats["layers"])
    assert sum(stats["pooled_histogram"]) == 12 * 64
    means = np.array(list(stats["image_means"].values()))  # [4 images, 12 layers]
    assert sorted(stats["image_means"]) == ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png"]
    variances = [layer["variance_across_images"] for layer in stats["layers"]]
    np.testing.assert_allclose(variances, means.var(axis=0), rtol=1e-6)
    assert 0 < max(variances)
    # the baseline is the accuracy of the loaded weights (not of a fresh random model)
    _, transform = build_transforms(resolve_data_config({"input_size": (3, 64, 64)}, model=model), "", 0.0)
    dataset = build_dataset(data, "val", transform)
    images = torch.stack([dataset[i][0] for i in range(4)])
    with torch.no_grad():
        expected = 100.0 * (model(images).argmax(1) == torch.tensor(dataset.targets)).float().mean().item()
    assert saved["baseline"]["acc1"] == pytest.approx(expected)
    curve = {row["threshold"]: row for row in saved["curve"]}
    assert sorted(curve) == [-2.0, 0.5, 1.5]
    assert curve[1.5]["query_ratio"] == 1.0 and curve[1.5]["acc1"] == pytest.approx(expected)
    assert curve[-2.0]["query_ratio"] == 0.25 and len(curve[-2.0]["layer_query_ratio"]) == 12
    assert curve[-2.0]["query_ratio"] <= curve[0.5]["query_ratio"] <= 1.0
    rows = read_csv(out / "curve.csv")
    assert [r["threshold"] for r in rows] == ["vanilla", "-2.0", "0.5", "1.5"]
    assert len(read_csv(out / "layers.csv")) == 12 and len(read_csv(out / "image_means.csv")) == 4
    assert result["files"]["json"] == str(out / "redundancy.json") and result["curve"] == saved["curve"]


def test_redundancy_tool_on_photographs_of_a_random_pvt_says_it_is_random(redundancy_tool, tmp_path):
    out = tmp_path / "out"
    result = redundancy_tool.main([
        "--model", "pvt_tiny", "--input", "skimage:chelsea", "skimage:coffee", "--input-size", "64",
        "--output", str(out),
    ])
    saved = json.loads((out / "redundancy.json").read_text())
    assert saved["random_init"] and "random" in saved["weights"]
    assert "curve" not in saved and not (out / "accuracy_vs_complexity.png").exists()
    layers = saved["statistics"]["layers"]
    # PVT-Ti: 2 blocks per stage on 16×16, 8×8, 4×4, 2×2 maps (the last stage's class token left out)
    assert [tuple(l["hw"]) for l in layers] == [(16, 16)] * 2 + [(8, 8)] * 2 + [(4, 4)] * 2 + [(2, 2)] * 2
    assert [sum(l["histogram"]) for l in layers] == [2 * h * w for h, w in [(16, 16)] * 2 + [(8, 8)] * 2
                                                      + [(4, 4)] * 2 + [(2, 2)] * 2]
    assert sorted(saved["statistics"]["image_means"]) == ["chelsea", "coffee"]
    assert all(-1 <= l["mean"] <= 1 and 0 <= l["share_above_0.8"] <= 1 for l in layers)
    assert (out / "correlation_variance_per_layer.png").stat().st_size > 5000
    assert result["num_images"] == 2


def test_redundancy_tool_errors_name_the_bad_input(redundancy_tool, tmp_path, capsys):
    with pytest.raises(SystemExit):
        redundancy_tool.main(["--model", "deit_huge", "--output", str(tmp_path)])
    assert "deit_huge" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        redundancy_tool.main(["--model", "pvt_small_dge", "--output", str(tmp_path)])
    assert "the vanilla model of 'pvt_small_dge' is 'pvt_small'" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images found"):
        redundancy_tool.main(["--model", "deit_tiny_vanilla", "--input", str(empty), "--output", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="val"):
        redundancy_tool.main(["--model", "deit_tiny_vanilla", "--data-path", str(empty),
                              "--output", str(tmp_path)])
