"""Where a vanilla timm model's time goes (``dge.analysis.time_shares``)."""
import copy

import pytest
import timm
import torch

import dge
from dge.analysis.time_shares import QUERY_SIDE, leaf_times, query_side
from dge.layers import record_routing


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vanilla = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()
    return vanilla, dge.patch(copy.deepcopy(vanilla), dict(granularities=(1, 2), region_size=2))


def test_leaf_times_cover_the_leaves_that_run_and_the_rest(models):
    vanilla, _ = models
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        times = leaf_times(vanilla, lambda: vanilla.forward_features(x), runs=2)
    leaves = {n for n, m in vanilla.named_modules() if n and not any(True for _ in m.children())}
    assert "" in times and set(times) <= leaves | {""} and all(v >= 0 for k, v in times.items() if k)
    assert {k.split(".", 2)[-1] for k in times if k.startswith("blocks.0.")} >= set(QUERY_SIDE) - {"attn.q"}
    assert "head" not in times  # never called by forward_features


@pytest.mark.parametrize("granularity, fraction", [(1, 1.0), (2, 0.25)])
def test_the_ideal_scales_the_query_side_by_the_kept_tokens(models, granularity, fraction):
    """All-fine routing keeps every token (ideal 1); φ = 2 keeps a quarter of the map's tokens
    (the class token is kept too), so the query side shrinks to about a quarter of itself."""
    vanilla, patched = models
    x = torch.randn(1, 3, 64, 64)
    times = {n: 1.0 for n in leaf_times(vanilla, lambda: vanilla.forward_features(x), runs=1)}
    with torch.inference_mode(), dge.force_granularity(patched, granularity), record_routing() as record:
        patched.forward_features(x)
    shares = query_side(times, patched, record)
    assert 0.0 < shares["query_side"] < 1.0 and shares["total_ms"] == len(times)
    kept = (16 * fraction + 1) / 17
    assert shares["ideal"] == pytest.approx(1.0 - shares["query_side"] * (1.0 - kept), abs=1e-4)
