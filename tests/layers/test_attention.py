"""dge's attention kinds and kernels (``dge.layers.attention``, ``dge.layers.kernels``, the MLP of
``dge.layers.block``): row tiles at CPU inference, the offsets' gradient scale, the registry."""
import pytest
import torch

from dge.layers import attention as attention_module
from dge.layers import kernels
from dge.layers import (
    Mlp,
    SpatialReductionAttention,
    token_centers,
)
from model_helpers import encoder_block

C = 16


def test_inference_mlp_in_row_tiles_equals_the_plain_mlp(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(C, 3 * C).eval()
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 5 * 3 * C)  # 23 rows: 5 tiles, the last partial
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
    attn = encoder_block("deformable", seed=2).attn
    hw = (7, 9)
    x = torch.randn(2, hw[0] * hw[1], C)
    centers = token_centers(*hw).expand(2, -1, -1)
    heads, points = attn.num_heads, attn.num_points
    # 10 queries per tile: 63 queries make 7 tiles, the last one partial.
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 10 * 2 * heads * attn.head_dim * points)
    with torch.inference_mode():
        tiled = attn(x, x, hw, centers)
    plain = attn(x, x, hw, centers)
    assert (tiled - plain).abs().max() < 1e-5
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 1 << 20)
    assert kernels.inference_tiles(attn, 63, 2 * heads * attn.head_dim * points, x.device) == 0
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 10)
    with torch.inference_mode():  # tiles are for the CPU only
        assert kernels.inference_tiles(attn, 63, 1, torch.device("cpu")) == 10
        assert kernels.inference_tiles(attn, 63, 1, torch.device("cuda")) == 0


def test_scale_grad_scales_only_the_gradient():
    x = torch.randn(5, requires_grad=True)
    y = attention_module.scale_grad(x, 0.1)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.full_like(x, 0.1))
    with torch.no_grad():  # nothing to scale: the input itself, no arithmetic
        assert attention_module.scale_grad(x, 0.1) is x


def test_attention_kinds_are_an_open_registry():
    """A new kind is one registered factory; the pyramid builds it by name, an unknown name is refused."""
    from dge.layers import ATTENTION_KINDS, create_attention, register_attention
    from dge.models.parts import build_blocks

    @register_attention("sr_twice")
    def sr_twice(dim, num_heads, sr_ratio=1, **_):
        return SpatialReductionAttention(dim, num_heads, sr_ratio=2 * sr_ratio)

    try:
        blocks = build_blocks(C, 2, 2, 2.0, attention="sr_twice", sr_ratio=2)
        assert [b.attn.sr_ratio for b in blocks] == [4, 4]
        assert create_attention("deformable", C, 2, num_points=3).num_points == 3
    finally:
        del ATTENTION_KINDS["sr_twice"]
    with pytest.raises(ValueError, match=r"attention must be one of \('sr', 'deformable'\); got 'sr_twice'"):
        create_attention("sr_twice", C, 2)
