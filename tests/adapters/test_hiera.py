"""Hiera and SAM 2's HieraDet under DGE (``dge.adapters.hiera``): the blocks that pool queries
between stages stay dense; Hiera's tokens go to raster order and back as the model's own
``reroll`` orders them; SAM 2's windows of 8, 4, 14 and 7 take what tiles them."""
import logging

import pytest
import timm
import torch

import dge
from dge.adapters.hiera import HieraAdapter, HieraDetAdapter
from model_helpers import TimmCase

HIERA = TimmCase("hiera_tiny_224", dict(embed_dim=32, num_heads=1, stages=(1, 2, 2, 1), img_size=(128, 128)), (128, 128))


def test_stage_transitions_stay_dense_and_the_log_says_so(caplog):
    model, _ = HIERA.build()
    with caplog.at_level(logging.INFO, logger="dge"):
        dge.patch(model)
    wrapped = [i for i, b in enumerate(model.blocks) if isinstance(b, dge.DynamicGrainedEncoder)]
    assert wrapped == [0, 2, 4]  # blocks 1, 3, 5 pool their queries (stride 2, wider output)
    assert "3 blocks of Hiera wrapped (3 kept dense)" in caplog.text


def test_hiera_tokens_go_to_raster_order_and_back():
    """The adapter's order is the model's: rerolled block outputs are maps in raster order."""
    model, _ = HIERA.build()
    dge.patch(model)
    for i in (0, 2, 4):
        adapter = model.blocks[i].block
        assert isinstance(adapter, HieraAdapter)
        n, c = len(adapter.raster), 3
        unrolled = torch.randn(2, n, c)
        call = adapter.prepare(unrolled)
        assert torch.equal(call.tokens.view(2, *adapter.hw, c), model.reroll(unrolled, i))
        assert torch.equal(call.restore(call.tokens), unrolled)


def test_sam2_windows_take_what_tiles_them():
    """sam2_hiera_tiny's windows (8, 4, 14, 7) and global blocks: Φ = {1, 2, 4} is refused with the
    way out; fitted, windows of 14 take {1, 2}, windows of 7 stay dense."""
    model = timm.create_model("sam2_hiera_tiny", embed_dim=32, num_heads=1)
    with pytest.raises(ValueError, match=r"window 14x14.*fit_to_windows"):
        dge.patch(model)
    pooling = [i for i, b in enumerate(model.blocks) if HieraDetAdapter.dense(b)]
    dge.patch(model, dge.adapters.fit_to_windows())
    phi = {}
    for i, block in enumerate(model.blocks):
        if i not in pooling:
            wrapped = isinstance(block, dge.DynamicGrainedEncoder)
            window = HieraDetAdapter.window(block.block.original if wrapped else block)
            phi.setdefault(window, set()).add(block.granularities if wrapped else "dense")
    assert all(not isinstance(model.blocks[i], dge.DynamicGrainedEncoder) for i in pooling)
    assert phi == {(8, 8): {(1, 2, 4)}, (4, 4): {(1, 2, 4)}, (14, 14): {(1, 2)}, None: {(1, 2, 4)}, (7, 7): {"dense"}}
