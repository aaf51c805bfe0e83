"""``dge.patch`` / ``dge.unpatch`` (``dge.adapters.patch``): blocks keep their mode; what cannot be
patched is said and leaves the model as it was; the stage walk wraps a pyramid stage by stage
(a patched ``pvt_tiny`` is ``pvt_tiny_dge``); a new family is one registered adapter."""
import subprocess
import sys
from typing import Tuple

import pytest
import timm
import torch
from torch import nn

import dge
from dge.adapters import ADAPTERS, Adapter, model_stages, register_adapter
from dge.layers.calibration import randomize_routers
from dge.layers import BlockCall, DynamicGrainedEncoder
from model_helpers import TimmCase, max_diff

VIT = TimmCase("vit_small_patch16_224", dict(img_size=(80, 112), depth=2), (80, 112))


def test_patched_blocks_take_the_mode_of_the_blocks_they_wrap():
    model = dge.patch(VIT.build()[0])  # in eval mode: routers choose by argmax
    assert not any(m.training for m in model.modules())
    assert all(m.training for m in dge.patch(timm.create_model("vit_small_patch16_224", img_size=32)).modules())


def test_patch_says_what_it_cannot_take():
    with pytest.raises(TypeError, match="takes a vision transformer with its blocks in model.blocks"):
        dge.patch(torch.nn.Linear(2, 2))
    model = timm.create_model("vit_small_patch16_224", img_size=32, attn_layer="diff")
    with pytest.raises(TypeError, match="supports .*timm's Block.* block 0 is Block with DiffAttention"):
        dge.patch(model)
    model = dge.patch(VIT.build()[0])
    with pytest.raises(ValueError, match="already patched"):
        dge.patch(model)
    with pytest.raises(ValueError, match="not patched"):
        dge.unpatch(dge.unpatch(model))


def test_a_refused_patch_leaves_the_model_as_it_was():
    """Block 1 of this SAM ViT has windows of 6, which regions of 4 do not tile: nothing is
    wrapped, the patch embedding is untouched, and Φ = {1, 2} (regions of 2) then patches it."""
    model = timm.create_model("samvit_base_patch16", img_size=(96, 96), window_size=4, depth=3,
                              global_attn_indexes=[2], embed_dim=32, num_heads=2).eval()
    model.blocks[1].window_size = 6
    blocks, embed_class = list(model.blocks), type(model.patch_embed)
    with pytest.raises(ValueError, match="region size 4 does not divide block 1's window 6x6.*fit_to_windows"):
        dge.patch(model)
    assert list(model.blocks) == blocks and type(model.patch_embed) is embed_class and not dge.is_patched(model)
    dge.patch(model, dge.DGEOptions(granularities=(1, 2)))
    assert all(isinstance(b, DynamicGrainedEncoder) for b in model.blocks)
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 96, 96))


def test_the_stage_walk_makes_pvt_tiny_into_pvt_tiny_dge():
    """Four stages, each on its own grid, a class token in the last: a patched ``pvt_tiny``
    has ``pvt_tiny_dge``'s tensors and computes what it computes."""
    torch.manual_seed(0)
    built = timm.create_model("pvt_tiny_dge", depths=(1, 2, 1, 1)).eval()
    randomize_routers(built, seed=1)
    patched = dge.patch(timm.create_model("pvt_tiny", depths=(1, 2, 1, 1)).eval())
    assert [len(s.blocks) for s in model_stages(patched)] == [1, 2, 1, 1]
    assert [s.num_extra for s in model_stages(patched)] == [0, 0, 0, 1]
    patched.load_state_dict(built.state_dict())  # strict: the same keys
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert max_diff(patched(x), built(x)) <= 1e-5
    dge.unpatch(patched)
    assert set(patched.state_dict()) == set(timm.create_model("pvt_tiny", depths=(1, 2, 1, 1)).state_dict())


class MixerBlock(nn.Module):
    """A family dge does not know: x + mlp(norm(x)) per token (no attention), called as blk(x, hw)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Linear(dim, dim)

    def forward(self, x, hw):
        return x + self.mlp(self.norm(x))


class MixerModel(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.blocks = nn.ModuleList([MixerBlock(dim), MixerBlock(dim)])

    def forward(self, x, hw):
        for blk in self.blocks:
            x = blk(x, hw)
        return x


class MixerAdapter(Adapter, nn.Module):
    """The recipe of docs/architecture.md: the block's modules, its call, its work on queries, its cost."""

    block_type = MixerBlock
    family = "the test's MixerBlock"

    def __init__(self, block: MixerBlock, stage=None):
        nn.Module.__init__(self)
        self.norm, self.mlp, self.dim = block.norm, block.mlp, block.norm.normalized_shape[0]
        self._original = (block,)

    @property
    def original(self):
        return self._original[0]

    def prepare(self, x, hw=None) -> BlockCall:
        return BlockCall(x, tuple(hw), self.forward_queries)

    def forward_queries(self, queries, context, hw, query_centers=None, rows=None):
        return queries + self.mlp(self.norm(queries))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        return 0.0, 5.0 * self.dim + self.dim * self.dim


def test_a_new_family_is_one_registered_adapter():
    model, hw = MixerModel().eval(), (5, 6)
    x = torch.randn(2, 30, 8)
    with pytest.raises(TypeError, match="MixerBlock"):
        dge.patch(model)
    register_adapter(MixerAdapter)
    try:
        with torch.no_grad():
            reference = model(x, hw)
            dge.patch(model)
            with dge.force_granularity(model, 1):
                assert max_diff(model(x, hw), reference) <= 1e-6
            with dge.force_granularity(model, 4), dge.record_routing() as record:
                coarse = model(x, hw)
        assert dge.complexity_report(record, model).beta.tolist() == pytest.approx([4 / 30, 4 / 30], rel=0.01)
        assert coarse.shape == x.shape and type(dge.unpatch(model).blocks[0]) is MixerBlock
    finally:
        del ADAPTERS[MixerBlock]


def test_a_whole_patched_model_loads_in_a_fresh_process(tmp_path):
    """The recording patch embedding is found by name (``dge.adapters.grid``) by a process
    that has not imported dge."""
    torch.manual_seed(0)
    model = dge.patch(timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, num_classes=0).eval())
    x = torch.randn(1, 3, 64, 64)
    torch.save({"model": model, "x": x}, tmp_path / "model.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "expected.pt")
    code = (f"import torch; d = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False); "
            f"assert torch.equal(d['model'](d['x']), torch.load({str(tmp_path / 'expected.pt')!r})); "
            "print(type(d['model'].patch_embed).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "PatchEmbed"
