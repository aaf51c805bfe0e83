"""The Dynamic Grained Encoder layer against slow, obviously-correct references."""
import math

import pytest
import torch

from dge.layers import attention as attention_module
from dge.layers import grained
from dge.layers import (
    DeformableAttention,
    DynamicGrainedEncoder,
    EncoderBlock,
    GrainedRouter,
    Mlp,
    QueryRows,
    SpatialReductionAttention,
    budget_loss,
    complexity_report,
    record_routing,
    token_centers,
)
from model_helpers import recorded, reference_dge

C = 16


def make_block(kind: str, seed: int = 0) -> EncoderBlock:
    torch.manual_seed(seed)
    if kind == "pvt":
        attn = SpatialReductionAttention(C, num_heads=2, qkv_bias=True, sr_ratio=2)
    elif kind == "global":
        attn = SpatialReductionAttention(C, num_heads=2, qkv_bias=True, sr_ratio=1)
    elif kind == "deformable":
        attn = DeformableAttention(C, num_heads=2, num_points=3, qkv_bias=True)
        torch.nn.init.normal_(attn.offsets.weight, std=0.3)  # let offsets depend on the query
    else:
        raise ValueError(kind)
    return EncoderBlock(C, attn, mlp_ratio=2.0).eval()


@pytest.mark.parametrize("kind", ["pvt", "global", "deformable"])
def test_all_fine_granularity_equals_vanilla_block(kind):
    block = make_block(kind)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4))).eval()
    hw = (13, 18)
    x = torch.randn(3, hw[0] * hw[1], C)
    centers = token_centers(*hw).expand(3, -1, -1)
    with torch.no_grad():
        vanilla = block.forward_queries(x, x, hw, centers)
        ones = torch.ones(3, 4, 5, dtype=torch.long)
        assert (dge(x, hw, ones) - vanilla).abs().max() < 1e-5
        # The general gather/scatter path: image 0 all-1 beside images with coarser maps.
        mixed = ones.clone()
        mixed[1] = 2
        mixed[2, :, 2:] = 4
        out, record = recorded(dge, x, hw, mixed)
        assert (out[0] - vanilla[0]).abs().max() < 1e-5
        assert record.of(dge).num_queries.tolist()[0] == hw[0] * hw[1]


def test_inference_mlp_in_row_tiles_equals_the_plain_mlp(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(C, 3 * C).eval()
    monkeypatch.setattr(attention_module, "TILE_ELEMENTS", 5 * 3 * C)  # 23 rows: 5 tiles, the last partial
    x = torch.randn(2, 23, C)
    tiled_calls = []
    original = Mlp._forward_tiled
    monkeypatch.setattr(Mlp, "_forward_tiled", lambda self, *a: tiled_calls.append(a[1]) or original(self, *a))
    with torch.inference_mode():
        tiled = mlp(x)
    plain = mlp(x)  # autograd on: one matrix product per layer
    assert tiled_calls == [5]
    assert tiled.shape == x.shape
    assert (tiled - plain).abs().max() < 1e-6
    mlp.train()
    with torch.no_grad():  # dropout active in training: never tiled
        mlp(x)
    assert tiled_calls == [5]


def test_inference_deformable_sampling_in_query_tiles_equals_one_pass(monkeypatch):
    attn = make_block("deformable", seed=2).attn
    hw = (7, 9)
    x = torch.randn(2, hw[0] * hw[1], C)
    centers = token_centers(*hw).expand(2, -1, -1)
    heads, points = attn.num_heads, attn.num_points
    # 10 queries per tile: 63 queries make 7 tiles, the last one partial.
    monkeypatch.setattr(attention_module, "TILE_ELEMENTS", 10 * 2 * heads * attn.head_dim * points)
    with torch.inference_mode():
        tiled = attn(x, x, hw, centers)
    plain = attn(x, x, hw, centers)
    assert (tiled - plain).abs().max() < 1e-5
    monkeypatch.setattr(attention_module, "TILE_ELEMENTS", 1 << 20)
    assert attention_module.inference_tiles(attn, 63, 2 * heads * attn.head_dim * points, x.device) == 0
    monkeypatch.setattr(attention_module, "TILE_ELEMENTS", 10)
    with torch.inference_mode():  # tiles are for the CPU only
        assert attention_module.inference_tiles(attn, 63, 1, torch.device("cpu")) == 10
        assert attention_module.inference_tiles(attn, 63, 1, torch.device("cuda")) == 0


@pytest.mark.parametrize("kind", ["pvt", "global", "deformable"])
def test_random_maps_match_the_region_loop_reference(kind):
    block = make_block(kind, seed=1)
    phi = (0, 1, 2, 4)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=phi)).eval()
    hw = (11, 14)  # not multiples of S = 4: bottom/right padding
    x = torch.randn(3, hw[0] * hw[1], C)
    gen = torch.Generator().manual_seed(3)
    gmap = torch.tensor(phi)[torch.randint(0, 4, (3, 3, 4), generator=gen)]
    gmap[0] = 1  # three images with clearly different query counts
    gmap[1, 0, 0] = 0
    with torch.no_grad():
        out, record = recorded(dge, x, hw, gmap)
        ref = reference_dge(block, x, hw, gmap, region=4)
    counts = record.of(dge).num_queries.tolist()
    assert len(set(counts)) == 3
    assert (out - ref).abs().max() < 1e-5
    with torch.no_grad():  # batch 1 takes the contiguous-copy path of the gather
        assert (dge(x[1:2], hw, gmap[1:2]) - ref[1:2]).abs().max() < 1e-5
    # Skipped regions pass through unchanged.
    i, j = 0, 0
    assert torch.equal(out[1].view(*hw, C)[i * 4 : i * 4 + 4, j * 4 : j * 4 + 4], x[1].view(*hw, C)[:4, :4])


@pytest.mark.parametrize("kind", ["pvt", "deformable"])
def test_packed_rows_have_no_padding_and_train_like_images_alone(kind):
    """A batch's queries are packed: the row-wise work (here the MLP) sees Σ_b M_b rows, not
    B·max M_b; only attention pads. Training through the packing gives each image's output
    and the summed weight gradients of the images run alone."""
    block = make_block(kind, seed=6).train()
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4))).train()
    hw = (8, 12)
    x = torch.randn(3, 96, C)
    gmap = torch.tensor([[[1, 1, 1], [1, 1, 2]], [[4, 4, 4], [4, 2, 4]], [[2, 1, 4], [4, 4, 4]]])
    mlp_rows = []
    handle = block.mlp.register_forward_hook(lambda m, i, o: mlp_rows.append(i[0].shape[:-1].numel()))
    out, record = recorded(dge, x, hw, gmap)
    handle.remove()
    counts = record.of(dge).num_queries.tolist()
    assert counts == [5 * 16 + 4, 5 + 4, 4 + 16 + 4]
    assert mlp_rows == [sum(counts)]
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), list(block.parameters()))
    for i in range(3):
        alone = dge(x[i : i + 1], hw, gmap[i : i + 1])
        assert (alone[0] - out[i]).abs().max() < 1e-5
        for g, g_alone in zip(grads, torch.autograd.grad((alone * weights[i : i + 1]).sum(), list(block.parameters()))):
            g -= g_alone
    assert max(g.abs().max().item() for g in grads) < 1e-4


def test_packed_rows_drop_a_whole_image_path_at_once():
    """Stochastic depth on packed rows draws once per image, as on a [B, M, C] batch."""
    attn = SpatialReductionAttention(C, num_heads=2, sr_ratio=1)
    block = EncoderBlock(C, attn, drop_path=0.5).train()
    counts = torch.tensor([3, 5, 2])
    rows = QueryRows(counts, max_rows=5, total=10)
    seen = set()
    for _ in range(20):
        kept = block._drop_path(torch.ones(1, 10, C), rows)[0, :, 0]
        per_image = kept.split(counts.tolist())
        assert all(torch.equal(part, part[:1].expand_as(part)) for part in per_image)
        assert set(kept.tolist()) <= {0.0, 2.0}
        seen.add(tuple(part[0].item() for part in per_image))
    assert any(len(set(draw)) > 1 for draw in seen)  # images are dropped independently


def test_query_rows_cut_into_segments_of_one_image(monkeypatch):
    rows = QueryRows(torch.tensor([5, 0, 2]), max_rows=5, total=7)
    segments, images = rows.segments()
    assert segments is rows and images is None  # segments no shorter than MIN_SEGMENT_ROWS: the images
    monkeypatch.setattr(grained, "MIN_SEGMENT_ROWS", 1)
    monkeypatch.setattr(grained, "SEGMENTS_PER_IMAGE", 2)
    segments, images = rows.segments()  # L = ceil(ceil(7 / 3) / 2) = 2 rows, S = (7 + 3·1) // 2 = 5
    assert images.tolist() == [0, 0, 0, 2, 2]
    assert segments.counts.tolist() == [2, 2, 1, 2, 0]  # the last segment: padding only
    padded = segments.pad(torch.arange(1.0, 8.0)[:, None])[..., 0]
    assert padded.tolist() == [[1, 2], [3, 4], [5, 0], [6, 7], [0, 0]]
    assert segments.unpad(padded[..., None])[:, 0].tolist() == list(range(1, 8))


@pytest.mark.parametrize("segment_rows", [1, 3, 256])
def test_attention_in_segments_equals_images_alone(monkeypatch, segment_rows):
    """Packed queries of images with different counts: attention per segment of one image's
    rows (with that image's keys) gives each image what it gets alone."""
    monkeypatch.setattr(grained, "MIN_SEGMENT_ROWS", segment_rows)
    monkeypatch.setattr(grained, "SEGMENTS_PER_IMAGE", 4)
    block = make_block("pvt", seed=8)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4))).eval()
    hw = (8, 12)
    x = torch.randn(3, 96, C)
    gmap = torch.tensor([[[1, 1, 1], [1, 1, 2]], [[4, 4, 4], [4, 2, 4]], [[2, 1, 4], [4, 4, 4]]])
    with torch.no_grad():
        out = dge(x, hw, gmap)
        for i in range(3):
            assert (dge(x[i : i + 1], hw, gmap[i : i + 1])[0] - out[i]).abs().max() < 1e-5


def test_scale_grad_scales_only_the_gradient():
    x = torch.randn(5, requires_grad=True)
    y = attention_module.scale_grad(x, 0.1)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.full_like(x, 0.1))
    with torch.no_grad():  # nothing to scale: the input itself, no arithmetic
        assert attention_module.scale_grad(x, 0.1) is x


def test_query_rows_pad_and_unpad():
    rows = QueryRows(torch.tensor([2, 0, 3]), max_rows=3, total=5)
    packed = torch.arange(1.0, 6.0)[:, None]
    padded = rows.pad(packed)
    assert padded[..., 0].tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5]]
    assert torch.equal(rows.unpad(padded), packed)
    same = QueryRows(torch.tensor([2, 2]), max_rows=2, total=4)  # no padding: views only
    assert same.padded_index is None
    assert same.pad(packed[:4]).data_ptr() == packed.data_ptr()


def test_extra_tokens_are_always_queries_and_match_reference():
    block = make_block("global", seed=2)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2)), num_extra_tokens=1).eval()
    hw = (5, 6)
    x = torch.randn(2, 1 + 30, C)
    gmap = torch.tensor([[[2, 1, 2], [2, 2, 1], [1, 2, 2]], [[2, 2, 2], [2, 2, 2], [2, 2, 2]]])
    with torch.no_grad():
        out, record = recorded(dge, x, hw, gmap)
        ref = reference_dge(block, x, hw, gmap, region=2, num_extra=1)
    assert (out - ref).abs().max() < 1e-5
    # image 0: φ=1 regions hold 4 + 4 + 2 (bottom row cut) tokens, six φ=2 regions 1 each.
    assert record.of(dge).num_queries.tolist() == [16, 9]


def test_layer_routing_uses_one_region_for_the_whole_map():
    block = make_block("pvt", seed=4)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4), routing="layer")).eval()
    hw = (10, 9)
    x = torch.randn(2, 90, C)
    with torch.no_grad():
        _, record = recorded(dge, x, hw)
        assert record.of(dge).granularity_map.shape == (2, 1, 1)
        gmap = torch.tensor([4, 2]).view(2, 1, 1)
        out, record = recorded(dge, x, hw, gmap)
        ref = reference_dge(block, x, hw, gmap, region=12)  # one 12×12 region covers the map
    assert record.of(dge).num_queries.tolist() == [3 * 3, 5 * 5]
    assert (out - ref).abs().max() < 1e-5


def test_training_runs_only_the_chosen_granularity_and_dense_mode_agrees():
    block = make_block("pvt", seed=5)
    sparse = DynamicGrainedEncoder(block, C).train()
    dense = DynamicGrainedEncoder(block, C, dict(estimator="official")).train()
    dense.router.load_state_dict(sparse.router.state_dict())
    hw = (12, 8)
    x = torch.randn(2, 96, C)
    torch.manual_seed(7)
    a, record_a = recorded(sparse, x, hw)
    torch.manual_seed(7)
    b, record_b = recorded(dense, x, hw)
    assert torch.equal(record_a.of(sparse).granularity_map, record_b.of(dense).granularity_map)
    assert torch.equal(record_a.of(sparse).num_queries, record_b.of(dense).num_queries)
    assert (a - b).abs().max() < 1e-5
    calls, kv_calls = [], []
    handles = [
        block.attn.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1])),
        block.attn.sr.register_forward_hook(lambda m, i, o: kv_calls.append(1)),
    ]
    _, record = recorded(sparse, x, hw)
    n_sparse = record.of(sparse).num_queries.sum().item()
    dense(x, hw)
    for handle in handles:
        handle.remove()
    # Sparse: the chosen queries only, of both images packed in one row set (no padding). Dense: all three granularities' queries (96 + 24 + 6 on
    # a 12×8 map) in one block call, so the key/value side (the SR conv) runs once for both.
    assert calls == [n_sparse, 96 + 24 + 6]
    assert len(kv_calls) == 2


@pytest.mark.parametrize("kind", ["global", "deformable"])
def test_dense_training_agrees_with_sparse_with_a_class_token(kind):
    block = make_block(kind, seed=6)
    sparse = DynamicGrainedEncoder(block, C, dict(init_fine_prob=0.34), num_extra_tokens=1).train()  # mixed maps
    dense = DynamicGrainedEncoder(block, C, dict(init_fine_prob=0.34, estimator="official"), num_extra_tokens=1).train()
    dense.router.load_state_dict(sparse.router.state_dict())
    hw = (9, 10)  # padded to 12×12: partial patches at the border
    x = torch.randn(2, 1 + 90, C)
    torch.manual_seed(3)
    a, record_a = recorded(sparse, x, hw)
    torch.manual_seed(3)
    b, record_b = recorded(dense, x, hw)
    assert torch.equal(record_a.of(sparse).granularity_map, record_b.of(dense).granularity_map)
    assert len(record_b.of(dense).granularity_map.unique()) == 3
    assert (a - b).abs().max() < 1e-5


def test_router_initially_prefers_the_finest_granularity():
    for phi, fine in [((1, 2, 4), 0), ((0, 1), 1), ((1, 2, 4, 8), 0)]:
        router = GrainedRouter(C, len(phi), fine_index=fine, init_fine_prob=0.95)
        p = torch.softmax(router(torch.zeros(1, 1, 1, C)), dim=-1)[0, 0, 0]
        assert abs(p[fine].item() - 0.95) < 1e-4
    # vtpack's value for K = 3: ±log√38.
    assert abs(GrainedRouter(C, 3, init_fine_prob=0.95).gate.bias[0].item() - math.log(math.sqrt(38))) < 1e-5


def test_straight_through_gradient_of_the_router_is_analytic():
    """Eq. 5-6: forward ŷ, backward p·ŷ, so dL/dh_k = Σ_i <ŷ_i, dL/dy_i> · dp_i/dh_k."""
    block = make_block("pvt", seed=8)
    dge = DynamicGrainedEncoder(block, C, dict(gumbel_tau=0.7)).train()
    hw = (8, 12)
    x = torch.randn(2, 96, C)
    weights = torch.randn(2, 96, C)
    recorded = {}
    original = GrainedRouter.select

    def recording_select(logits, stochastic, tau=1.0):
        index, probs = original(logits, stochastic, tau)
        recorded.update(index=index, probs=probs.detach())
        return index, probs

    GrainedRouter.select = staticmethod(recording_select)
    try:
        out = dge(x, hw)
    finally:
        GrainedRouter.select = staticmethod(original)
    (out * weights).sum().backward()

    index, probs = recorded["index"], recorded["probs"]
    gmap = torch.tensor(dge.granularities)[index]
    with torch.no_grad():
        delta = dge.eval()(x, hw, gmap) - x  # ŷ unpooled, same value as in training
    region = (torch.arange(8)[:, None] // 4 * 3 + torch.arange(12)[None, :] // 4).reshape(-1)
    dl_dp = torch.zeros(2, 6).index_add_(1, region, (delta * weights).sum(-1))  # [B, R]
    p = probs.view(2, 6, 3)
    chosen = index.view(2, 6)
    p_theta = p.gather(-1, chosen[..., None])[..., 0]
    one_hot = torch.nn.functional.one_hot(chosen, 3).float()
    dp_dh = p_theta[..., None] * (one_hot - p) / 0.7  # softmax Jacobian row of the chosen k
    expected = (dl_dp[..., None] * dp_dh).sum(dim=(0, 1))
    assert torch.allclose(dge.router.gate.bias.grad, expected, atol=1e-4, rtol=1e-3)


def test_budget_loss_gradient_reaches_the_router_and_lowers_fine_scores():
    block = make_block("pvt", seed=9)
    dge = DynamicGrainedEncoder(block, C).train()
    hw = (8, 8)
    x = torch.randn(4, 64, C)
    _, record = recorded(dge, x, hw)
    report = complexity_report(record)
    loss = budget_loss(report.beta, budget=0.25, weight=1.0)
    loss.backward()
    grad = dge.router.gate.bias.grad
    assert grad is not None and grad.abs().sum() > 0
    # Descending the loss raises the coarse logits relative to the finest one.
    assert grad[0] > 0 and grad[2] < grad[0]


def _hand_block_cost(n, nk, hidden, sr):
    """Hand count for make_block('pvt'): C = 16, SR ratio 2, MLP hidden 32."""
    fixed = n * C * C  # sr conv: (n / sr²) outputs × C × C × sr²
    fixed += 5 * nk * C + 2 * nk * C * C + 5 * n * C  # sr norm, kv, norm1 of the context
    per_query = C * C + 2 * nk * C + C * C + 10 * C + 2 * C * hidden
    return fixed, per_query


def test_beta_equals_the_hand_count_for_a_known_map():
    block = make_block("pvt", seed=10)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(0, 1, 2, 4))).eval()
    hw = (8, 8)
    x = torch.randn(1, 64, C)
    gmap = torch.tensor([[[1, 2], [4, 0]]])
    with torch.no_grad():
        _, record = recorded(dge, x, hw, gmap)
    fixed, per_query = _hand_block_cost(64, 16, 32, 2)
    queries = 16 + 4 + 1 + 0
    expected = (fixed + per_query * queries) / (fixed + per_query * 64)
    assert record.of(dge).num_queries.tolist() == [queries]
    assert abs(complexity_report(record).beta.item() - expected) < 1e-6
    with torch.no_grad():
        _, record = recorded(dge, x, hw, torch.ones(1, 2, 2, dtype=torch.long))
    assert complexity_report(record).beta.item() == 1.0


def test_routing_is_accounted_only_inside_a_record_and_costed_once_per_size(monkeypatch):
    block = make_block("pvt", seed=11)
    dge = DynamicGrainedEncoder(block, C).eval()
    cost = block.complexity
    sizes = []
    monkeypatch.setattr(block, "complexity", lambda hw, num_extra=0: sizes.append(hw) or cost(hw, num_extra))
    x, hw = torch.randn(1, 64, C), (8, 8)
    with torch.no_grad():
        plain = dge(x, hw)  # nobody can read the routing: it is not accounted
        assert sizes == []
        recorded_out, record = recorded(dge, x, hw)
        recorded(dge, x, hw)
        recorded(dge, torch.randn(1, 48, C), (6, 8))
    assert torch.equal(plain, recorded_out)
    assert sizes == [(8, 8), (6, 8)]  # once per map size
    assert record.of(dge).block_cost == cost((8, 8), 0)


def test_beta_sums_over_layers_and_counts_the_router():
    model = torch.nn.ModuleList(
        [DynamicGrainedEncoder(make_block("pvt", seed=s), C) for s in (11, 12)]
    ).eval()
    x = torch.randn(1, 64, C)
    maps = [torch.tensor([[[2, 2], [2, 2]]]), torch.tensor([[[4, 4], [1, 1]]])]
    with torch.no_grad(), record_routing() as record:
        for m, g in zip(model, maps):
            m(x, (8, 8), g)
    fixed, per_query = _hand_block_cost(64, 16, 32, 2)
    dyn = [fixed + per_query * 16, fixed + per_query * (1 + 1 + 32)]
    static = 2 * (fixed + per_query * 64)
    report = complexity_report(record, model)
    assert abs(report.beta.item() - sum(dyn) / static) < 1e-6
    assert report.layer_beta.shape == (2, 1)
    with torch.no_grad():  # routed by the router: its C·K per region counts as dynamic
        _, record = recorded(model[0], x, (8, 8))
    r = record.of(model[0])
    assert r.router_flops == 4 * C * 3
    assert r.dynamic_flops().item() == pytest.approx(fixed + 4 * C * 3 + per_query * r.num_queries.item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(granularities=(1, 3, 4)), "granularities must divide the region size 4; got 3"),
        (dict(granularities=()), "non-empty"),
        (dict(granularities=(-1, 1)), "non-negative"),
        (dict(granularities=(0,)), "positive granularity"),
        (dict(routing="pixel"), "routing must be one of"),
    ],
)
def test_bad_configuration_is_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicGrainedEncoder(make_block("pvt"), C, kwargs)


def test_bad_input_is_rejected_with_a_clear_error():
    dge = DynamicGrainedEncoder(make_block("pvt"), C).eval()
    x = torch.randn(1, 64, C)
    with pytest.raises(ValueError, match=r"expected E \+ H\*W = 0 \+ 8\*9 = 72 tokens; got 64"):
        dge(x, (8, 9))
    with pytest.raises(ValueError, match=r"shape \[B, Hr, Wr\] = \[1, 2, 2\]"):
        dge(x, (8, 8), torch.ones(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values must be in \(1, 2, 4\); got \[3\]"):
        dge(x, (8, 8), torch.full((1, 2, 2), 3))
    for budget in (-0.1, 1.5):
        with pytest.raises(ValueError, match="budget must be in \\[0, 1\\]"):
            budget_loss(torch.ones(2), budget)


def test_vanilla_block_weights_load_into_the_dge_wrapper():
    block = make_block("pvt", seed=13)
    dge = DynamicGrainedEncoder(make_block("pvt", seed=14), C)
    result = dge.load_state_dict(block.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["router.gate.bias", "router.gate.weight"]
    assert not result.unexpected_keys
    assert torch.equal(dge.block.attn.q.weight, block.attn.q.weight)


def test_the_all_fine_shortcut_equals_the_tensor_program(monkeypatch):
    """Eager inference runs the plain block when every query is one token; a graph capture
    runs the general gather / un-pool program. Both give the same tokens."""
    from dge.layers import encoder as encoder_module

    block = make_block("pvt", seed=4)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4))).eval()
    hw = (13, 18)
    x = torch.randn(1, hw[0] * hw[1], C)
    ones = torch.ones(1, 4, 5, dtype=torch.long)
    calls = []
    block.attn.register_forward_hook(lambda m, i, o: calls.append(i[0] is i[1]))
    with torch.no_grad():
        eager = dge(x, hw, ones)
        monkeypatch.setattr(encoder_module, "is_capturing", lambda: True)
        program = dge(x, hw, ones)
    assert calls == [True, False]  # the plain call block(x, x, ...), then packed queries
    assert (eager - program).abs().max() < 1e-5
