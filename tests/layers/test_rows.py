"""Packed query rows (``dge.layers.rows``): padding, segments of one image, stochastic depth per image."""
import torch

from dge.layers import rows as rows_module
from dge.layers import (
    EncoderBlock,
    QueryRows,
    SpatialReductionAttention,
)

C = 16


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
    monkeypatch.setattr(rows_module, "MIN_SEGMENT_ROWS", 1)
    monkeypatch.setattr(rows_module, "SEGMENTS_PER_IMAGE", 2)
    segments, images = rows.segments()  # L = ceil(ceil(7 / 3) / 2) = 2 rows, S = (7 + 3·1) // 2 = 5
    assert images.tolist() == [0, 0, 0, 2, 2]
    assert segments.counts.tolist() == [2, 2, 1, 2, 0]  # the last segment: padding only
    padded = segments.pad(torch.arange(1.0, 8.0)[:, None])[..., 0]
    assert padded.tolist() == [[1, 2], [3, 4], [5, 0], [6, 7], [0, 0]]
    assert segments.unpad(padded[..., None])[:, 0].tolist() == list(range(1, 8))


def test_query_rows_pad_and_unpad():
    rows = QueryRows(torch.tensor([2, 0, 3]), max_rows=3, total=5)
    packed = torch.arange(1.0, 6.0)[:, None]
    padded = rows.pad(packed)
    assert padded[..., 0].tolist() == [[1, 2, 0], [0, 0, 0], [3, 4, 5]]
    assert torch.equal(rows.unpad(padded), packed)
    same = QueryRows(torch.tensor([2, 2]), max_rows=2, total=4)  # no padding: views only
    assert same.padded_index is None
    assert same.pad(packed[:4]).data_ptr() == packed.data_ptr()
