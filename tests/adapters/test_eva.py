"""EVA / EVA-02 under DGE (``dge.adapters.eva``): a pooled query's rotary angle is timm's table
at its centre; grids too small for that are refused with the size that works; EVA-02-B's
separate projections and normed SwiGLU are the untouched model at all-fine routing and cost
what fvcore counts."""
import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import build_rotary_pos_embed

import dge
from dge.adapters.eva import rope_at_centers
from dge.layers.calibration import set_logit_offset
from dge.analysis.flop_count import FlopCountAnalysis
from model_helpers import TimmCase, max_diff, recorded


@pytest.mark.parametrize("offset", [0.5, 1.5, 0.25])
def test_rotary_table_at_pooled_centres_is_timms_table_there(offset):
    """EVA-02's table (rescaled grid, both layouts) at centres off the tokens equals timm's
    own table built on the grid shifted by that much; extra tokens (centre 0) unrotated."""
    model = timm.create_model("eva02_tiny_patch14_224", img_size=(84, 112))
    hw, rope = (6, 8), model.rope
    for half in (False, True):
        table = lambda shift: torch.cat(build_rotary_pos_embed(
            list(hw), bands=rope.bands, in_pixels=False, ref_feat_shape=rope.ref_feat_shape,
            grid_offset=shift, rotate_half=half), dim=-1)
        i, j = torch.meshgrid(torch.arange(6.0), torch.arange(8.0), indexing="ij")
        centers = torch.stack([i, j], dim=-1).view(1, -1, 2) + 0.5 + offset
        got = rope_at_centers(table(0.0), hw, torch.cat([torch.zeros(1, 1, 2), centers], dim=1))[0]
        inside = (centers[0] < torch.tensor(hw)).all(dim=1)  # a centre past the last token: not a pooled one
        assert max_diff(got[1:][inside], table(offset)[inside]) <= 2e-6
        assert torch.equal(got[0], torch.cat([torch.zeros(rope.dim), torch.ones(rope.dim)]))


def test_patched_eva_says_which_grids_its_rotary_table_allows():
    model = dge.patch(timm.create_model("eva02_tiny_patch14_224", img_size=(70, 112), depth=2).eval())
    with pytest.raises(ValueError, match="5x8 patch grid turns .* at least 6 patches a side"):
        model.forward_features(torch.randn(1, 3, 70, 112))


def test_eva02_base_is_the_untouched_model_at_all_fine_routing_and_costs_fvcores_count():
    """Separate q / k / v projections and a normed SwiGLU (EVA-02-B), 6×8 patches."""
    model, x = TimmCase("eva02_base_patch14_224", dict(img_size=(84, 112), depth=2), (84, 112)).build()
    with torch.no_grad():
        e, hw = model.num_prefix_tokens, (6, 8)
        tokens = torch.randn(1, e + 48, model.embed_dim)
        vanilla = FlopCountAnalysis(model.blocks[0], (tokens,)).total()  # (no rotation: 0 multiply-adds either way)
        reference = model.forward_features(x)
        dge.patch(model)
        set_logit_offset(model, [30.0])
        routed, _ = recorded(model.forward_features, x)
    assert max_diff(routed, reference) <= 1e-5
    fixed, per_query, delta = model.blocks[0].block.complexity(hw, e)
    assert fixed + delta + per_query * tokens.shape[1] == pytest.approx(vanilla, rel=1e-6)
