"""The Dynamic Grained Encoder (``dge.layers.encoder``) against slow, obviously-correct references:
routing, packing, un-pooling, extra tokens, training estimators, β's accounting, bad input."""
import pytest
import torch

from dge.layers import rows as rows_module
from dge.layers import (
    BlockCost,
    BudgetLoss,
    DynamicGrainedEncoder,
    budget_loss,
    complexity_report,
    record_routing,
    token_centers,
)
from model_helpers import encoder_block, recorded, reference_dge

C = 16


@pytest.mark.parametrize("kind", ["pvt", "global", "deformable"])
def test_all_fine_granularity_equals_vanilla_block(kind):
    block = encoder_block(kind)
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


@pytest.mark.parametrize("kind", ["pvt", "global", "deformable"])
def test_random_maps_match_the_region_loop_reference(kind):
    block = encoder_block(kind, seed=1)
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
    block = encoder_block(kind, seed=6).train()
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


@pytest.mark.parametrize("segment_rows", [1, 3, 256])
def test_attention_in_segments_equals_images_alone(monkeypatch, segment_rows):
    """Packed queries of images with different counts: attention per segment of one image's
    rows (with that image's keys) gives each image what it gets alone."""
    monkeypatch.setattr(rows_module, "MIN_SEGMENT_ROWS", segment_rows)
    monkeypatch.setattr(rows_module, "SEGMENTS_PER_IMAGE", 4)
    block = encoder_block("pvt", seed=8)
    dge = DynamicGrainedEncoder(block, C, dict(granularities=(1, 2, 4))).eval()
    hw = (8, 12)
    x = torch.randn(3, 96, C)
    gmap = torch.tensor([[[1, 1, 1], [1, 1, 2]], [[4, 4, 4], [4, 2, 4]], [[2, 1, 4], [4, 4, 4]]])
    with torch.no_grad():
        out = dge(x, hw, gmap)
        for i in range(3):
            assert (dge(x[i : i + 1], hw, gmap[i : i + 1])[0] - out[i]).abs().max() < 1e-5


def test_extra_tokens_are_always_queries_and_match_reference():
    block = encoder_block("global", seed=2)
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
    block = encoder_block("pvt", seed=4)
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
    block = encoder_block("pvt", seed=5)
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
    block = encoder_block(kind, seed=6)
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


def _hand_block_cost(n, nk, hidden, sr):
    """Hand count for encoder_block('pvt'): C = 16, SR ratio 2, MLP hidden 32."""
    fixed = n * C * C  # sr conv: (n / sr²) outputs × C × C × sr²
    fixed += 5 * nk * C + 2 * nk * C * C + 5 * n * C  # sr norm, kv, norm1 of the context
    per_query = C * C + 2 * nk * C + C * C + 10 * C + 2 * C * hidden
    return fixed, per_query


def test_beta_equals_the_hand_count_for_a_known_map():
    block = encoder_block("pvt", seed=10)
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
    block = encoder_block("pvt", seed=11)
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
    assert record.of(dge).block_cost == BlockCost(*cost((8, 8), 0))


def test_beta_sums_over_layers_and_counts_the_router():
    model = torch.nn.ModuleList(
        [DynamicGrainedEncoder(encoder_block("pvt", seed=s), C) for s in (11, 12)]
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
        (dict(gumbel_tau=float("nan")), r"gumbel_tau must be a finite number > 0; got nan"),
        (dict(gumbel_tau=float("inf")), r"gumbel_tau must be a finite number > 0; got inf"),
        (dict(init_fine_prob=float("nan")), r"init_fine_prob must be in \(0, 1\); got nan"),
    ],
)
def test_bad_configuration_is_rejected_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicGrainedEncoder(encoder_block("pvt"), C, kwargs)


def test_bad_input_is_rejected_with_a_clear_error():
    dge = DynamicGrainedEncoder(encoder_block("pvt"), C).eval()
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
    for budget, weight in ((float("nan"), 1.0), (0.5, float("nan")), (0.5, float("inf"))):
        with pytest.raises(ValueError, match="budget must be in|weight must be a finite number >= 0"):
            BudgetLoss(budget, weight)


def test_vanilla_block_weights_load_into_the_dge_wrapper():
    block = encoder_block("pvt", seed=13)
    dge = DynamicGrainedEncoder(encoder_block("pvt", seed=14), C)
    result = dge.load_state_dict(block.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["router.gate.bias", "router.gate.weight"]
    assert not result.unexpected_keys
    assert torch.equal(dge.block.attn.q.weight, block.attn.q.weight)


def test_the_all_fine_shortcut_equals_the_tensor_program(monkeypatch):
    """Eager inference runs the plain block when every query is one token; a graph capture
    runs the general gather / un-pool program. Both give the same tokens."""
    from dge.layers import encoder as encoder_module

    block = encoder_block("pvt", seed=4)
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


def test_a_block_outside_the_protocol_is_refused_with_what_it_lacks():
    class Plain(torch.nn.Module):
        def forward(self, x, hw):
            return x

        def complexity(self, hw, num_extra=0):
            return 0.0, 1.0

    with pytest.raises(TypeError, match=r"Plain lacks \['prepare', 'forward_queries'\]"):
        DynamicGrainedEncoder(Plain(), C)


def test_a_granularity_map_may_be_a_function_of_the_region_grid():
    """The map for every image from the region grid (Hr, Wr), as force_granularity gives it."""
    dge = DynamicGrainedEncoder(encoder_block("pvt", seed=3), C).eval()
    x, hw = torch.randn(2, 8 * 12, C), (8, 12)
    grids = []
    per_region = torch.tensor([[1, 2, 4], [4, 2, 1]])
    with torch.no_grad():
        by_function = dge(x, hw, lambda grid: grids.append(grid) or per_region)
        by_tensor = dge(x, hw, per_region.expand(2, -1, -1))
    assert grids == [(2, 3)] and torch.equal(by_function, by_tensor)
