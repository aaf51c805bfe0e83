"""The contract every block family meets under ``dge.patch``, one case per family: all-fine
routing is the untouched model; the original state dict loads with only the routers new, and
``unpatch`` gives the model back; β (Eq. 7) is fvcore's per-image count; inference reads one
value (its ``nonzero``) per block at batch 1 and 2; ``torch.export`` stays dynamic; half
precision gives float32's β under the same routing.

Adding a family is adding one case to ``FAMILIES`` (docs/architecture.md)."""
import copy
import functools
import io

import pytest
import timm
import torch

import dge
from dge.adapters import model_stages
from dge.layers.calibration import calibrate, randomize_routers, set_logit_offset
from dge.analysis.flop_count import FlopCountAnalysis
from dge.analysis.syncs import count_host_reads
from dge.layers import complexity_report, dge_modules, is_dge_state
from model_helpers import TimmCase, forced_routing, fx_extractor, granularity_maps, max_diff, recorded


SWIN = dict(embed_dim=32, depths=(2, 2), num_heads=(1, 2), img_size=(76, 84))  # 19×21 then 10×11 tokens
FAMILIES = {
    # timm's Block + Attention: DINOv2 with 4 registers and layer scale (5 prefix tokens), 5×7 patches
    "vit": TimmCase("vit_small_patch14_reg4_dinov2", dict(img_size=(70, 98), depth=2), (70, 98)),
    # EVA-02: rotary embeddings, fused qkv with q / v biases, gamma layer scales, SwiGLU; 6×8 patches
    "eva": TimmCase("eva02_tiny_patch14_224", dict(img_size=(84, 112), depth=2, init_values=0.1), (84, 112)),
    # SAM's encoder: windows of 4 padded (11×15 patches), block 1 global, relative positions
    "sam": TimmCase("samvit_base_patch16", dict(img_size=(176, 240), window_size=4, depth=2, global_attn_indexes=[1],
                                                embed_dim=64, num_heads=2), (176, 240)),
    # dge's own blocks: PVT (SR attention, four stages, a class token in the last), DPVT (deformable)
    "pvt": TimmCase("pvt_tiny", dict(depths=(1, 1, 1, 1))),
    "dpvt": TimmCase("dpvt_tiny", dict(depths=(1, 1, 1, 1))),
    # Swin v1 with windows of 8 (shift 4) and Swin-T's windows of 7 (shift 3, Φ = {1, 7}), Swin v2
    # (post-norm, cosine attention, position MLP); two stages, padded windows, a shifted block each
    "swin": TimmCase("swin_tiny_patch4_window7_224", dict(SWIN, window_size=8), (76, 84)),
    "swin_w7": TimmCase("swin_tiny_patch4_window7_224", SWIN, (76, 84), dict(granularities=(1, 7))),
    "swinv2": TimmCase("swinv2_tiny_window8_256", SWIN, (76, 84)),
    # PVT v2: SR attention, and linear attention (7×7 pooled context); depthwise-conv MLP
    "pvt_v2": TimmCase("pvt_v2_b0", dict(depths=(1, 1, 1, 1))),
    "pvt_v2_li": TimmCase("pvt_v2_b2_li", dict(depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256))),
    # Hiera (unrolled tokens, mask units of 8×8 and 4×4, then global) and SAM 2's HieraDet (windows
    # of 8 and 4, a global block; it takes maps that its windows divide); stage transitions kept dense
    "hiera": TimmCase("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1), img_size=(128, 128)),
                      (128, 128)),
    "sam2_hiera": TimmCase("sam2_hiera_tiny", dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1),
                                                   global_att_blocks=(4,), window_spec=(8, 4, 4, 2)), (128, 160)),
}
CASES = sorted(FAMILIES)


@functools.lru_cache(maxsize=None)
def _routed(case: str):
    model, x = FAMILIES[case].build()
    dge.patch(model, FAMILIES[case].options)
    randomize_routers(model, seed=0)
    with torch.no_grad():
        calibrate(model, lambda: model.forward_features(x), 0.5, steps=10)
    return model, x


def routed(case: str):
    """(the family's model patched, routers routing by content at β ≈ 0.5 on x; x): a copy."""
    return copy.deepcopy(_routed(case))


def num_blocks(model) -> int:
    return len(dge.dge_modules(model))


@pytest.mark.parametrize("case", CASES)
def test_all_fine_routing_is_the_untouched_model(case):
    model, x = FAMILIES[case].build()
    with torch.no_grad():
        reference = model.forward_features(x)
        dge.patch(model, FAMILIES[case].options)
        with dge.force_granularity(model, 1):  # the given map: the vanilla call of each block
            forced = model.forward_features(x)
        set_logit_offset(model, [30.0])  # the routers choose φ = 1 everywhere
        routed_out, record = recorded(model.forward_features, x)
    assert max_diff(forced, reference) <= 1e-5 and max_diff(routed_out, reference) <= 1e-5
    # every token a query: β = 1 + the routers' own cost (< 0.1%) - what the vanilla block computes
    # beyond the DGE form at every token (0 but for SAM: padding tokens, relative positions)
    report = complexity_report(record, model)
    static = sum(report.static)
    routers = sum(info.router_flops for info in record.infos) / static
    delta = sum(info.block_cost.vanilla_delta for info in record.infos) / static
    assert 0.0 < routers < 0.001
    torch.testing.assert_close(report.beta, torch.full_like(report.beta, 1.0 + routers - delta), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("case", CASES)
def test_the_original_state_dict_loads_with_only_the_routers_new_and_unpatch_restores(case):
    model, x = FAMILIES[case].build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = [list(stage.blocks) for stage in model_stages(model)]
    with torch.no_grad():
        reference = model.forward_features(x)
    patched = dge.patch(FAMILIES[case].build(seed=1)[0], FAMILIES[case].options)
    loaded = patched.load_state_dict(original, strict=False)
    assert not loaded.unexpected_keys
    assert loaded.missing_keys and all(".router." in k for k in loaded.missing_keys)
    weights = [k for k in patched.state_dict() if ".router." not in k and not is_dge_state(k)]  # not the options
    assert {k.replace(".block.", ".") for k in weights} == set(original)
    with torch.no_grad(), dge.force_granularity(patched, 1):
        assert max_diff(patched.forward_features(x), reference) <= 1e-5
    assert dge.unpatch(dge.patch(model, FAMILIES[case].options)) is model and not dge.is_patched(model)
    assert [list(stage.blocks) for stage in model_stages(model)] == blocks
    assert set(model.state_dict()) == set(original)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), reference)


@pytest.mark.parametrize("case", CASES)
def test_beta_is_fvcores_per_image_count(case):
    """Each block's static cost is fvcore's count of the vanilla block; as routed, each block's
    dynamic cost (router included) is fvcore's count of the traced DGE block, and β is their
    ratio over the blocks (Eq. 7)."""
    model, x = FAMILIES[case].build()
    image = x[:1]
    with torch.no_grad():
        vanilla = FlopCountAnalysis(model, (image,)).by_module()
    model, _ = routed(case)
    with torch.no_grad():
        _, record = recorded(model, image)
        counted = FlopCountAnalysis(model, (image,)).by_module()
    report = complexity_report(record, model)
    traced = [FlopCountAnalysis.traced_name(name) for name in report.names]
    for name, dynamic, static in zip(traced, report.dynamic_flops[:, 0].tolist(), report.static):
        assert static == pytest.approx(vanilla[name], rel=0.01), name
        assert dynamic == pytest.approx(counted[name], rel=0.01), name
    fvcore_beta = sum(counted[n] for n in traced) / sum(vanilla[n] for n in traced)
    assert float(report.beta) == pytest.approx(fvcore_beta, rel=0.005)
    assert 0.25 < float(report.beta) < 0.75  # mixed routing (calibrated to 0.5 over both images)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("case", CASES)
def test_inference_reads_one_value_per_block(case, batch):
    """Each block's query count is the shape of its one nonzero; padding sizes are bounds
    known on the host; nothing else is read from a tensor or copied from the host."""
    model, x = routed(case)
    with torch.no_grad():
        model.forward_features(x[:batch])  # caches built (layouts, costs)
        assert count_host_reads(lambda: model.forward_features(x[:batch])) == {"aten::nonzero": num_blocks(model)}


@pytest.mark.parametrize("case", CASES)
def test_torch_export_stays_dynamic(case):
    """One program exported at one image's routing runs another image's routing exactly."""
    model, x = routed(case)
    with torch.no_grad():
        program = torch.export.export(model, (x[:1],))
        for image in (x[:1], x[1:]):
            assert max_diff(program.module()(image), model(image)) <= 1e-5
        _, first = recorded(model, x[:1])
        _, second = recorded(model, x[1:])
    assert any(not torch.equal(a, b) for a, b in zip(granularity_maps(first), granularity_maps(second)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_keeps_float32s_beta_under_the_same_routing(case, dtype):
    model, x = routed(case)
    x = x[:1]
    with torch.no_grad():
        _, record = recorded(model.forward_features, x)
        with forced_routing(model, granularity_maps(record)):
            y32, record = recorded(model.forward_features, x)
            model.to(dtype)
            y, half = recorded(model.forward_features, x.to(dtype))
    beta32, beta = complexity_report(record, model).beta, complexity_report(half, model).beta
    assert beta.dtype == torch.float32 and 0.3 < float(beta32) < 0.7
    torch.testing.assert_close(beta, beta32, rtol=1e-6, atol=0.0)
    untouched, _ = FAMILIES[case].build()
    with torch.no_grad():
        finite = bool(torch.isfinite(untouched.to(dtype).forward_features(x.to(dtype))).all())
    error = (y.float() - y32).norm() / y32.norm()  # where the untouched model is finite in dtype (timm's
    assert error < (0.01 if dtype == torch.float16 else 0.05) or not finite, error  # Swin v2: not in fp16)


@pytest.mark.parametrize("case", CASES)
def test_timms_model_contract_holds_when_patched(case):
    """timm's contract, patched as unpatched: ``forward_intermediates`` gives ``feature_info``'s
    maps and ``forward_features``; a ``features_only`` model patches (every block) and gives
    its own maps at all-fine routing; an FX trace (DGE blocks are leaves) is the eager model; training reaches
    every parameter, the routers included."""
    model, x = routed(case)
    name, kwargs = FAMILIES[case].name, FAMILIES[case].kwargs
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x[:1])
        assert torch.equal(final, model.forward_features(x[:1]))
        assert [m.shape[1] for m in maps] == [f["num_chs"] for f in info] and len(maps) == len(info)
        traced = torch.cat(tuple(fx_extractor(model)(x[:1]).values()))
        assert torch.equal(traced, model(x[:1]))
        extractor = timm.create_model(name, features_only=True, out_indices=tuple(range(len(info))), **kwargs).eval()
        reference = extractor(x[:1])
        dge.patch(extractor, FAMILIES[case].options)
        with dge.force_granularity(extractor, 1):
            fine = extractor(x[:1])
    assert len(dge_modules(extractor)) == num_blocks(model) and len(fine) == len(reference)
    assert max(max_diff(a, b) for a, b in zip(fine, reference)) <= 1e-5
    model.train()
    model(x).float().logsumexp(dim=-1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("case", CASES)
def test_a_patched_model_pickles_whole(case):
    """``torch.save(model)`` / ``torch.load`` of the whole patched model: the same routing and output."""
    model, x = routed(case)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_every_registered_adapter_has_a_case():
    """A new family's adapter comes with its case here."""
    covered = set()
    for case in FAMILIES.values():
        model, _ = case.build()
        covered |= {dge.adapters.find_adapter(b, "") for stage in model_stages(model) for b in stage.blocks}
    assert set(dge.adapters.ADAPTERS.values()) == covered
