"""Packed query rows: the queries of a batch of images, one image after the other in one
[1, T, C] tensor (``QueryRows``), and where each row belongs. Every row-wise part of a block
runs on the T rows unpadded; attention pads per short segment of one image's rows. Every
size here is known on the host without reading a tensor's value."""
import functools
from typing import Optional

import torch

__all__ = ["QueryRows", "row_images", "SEGMENTS_PER_IMAGE", "MIN_SEGMENT_ROWS"]


# Attention on packed rows of images with different query counts pads per segment of
# L = max(MIN_SEGMENT_ROWS, ceil(T / (B · SEGMENTS_PER_IMAGE))) rows (see QueryRows.segments).
SEGMENTS_PER_IMAGE = 8
MIN_SEGMENT_ROWS = 256


def _owners(counts: torch.Tensor, total: int) -> torch.Tensor:
    """[total] long: i repeated counts[i] times (the owner of each of ``total`` items)."""
    return torch.arange(counts.shape[0], device=counts.device).repeat_interleave(counts, output_size=total)


def row_images(batch: int, rows: int, device) -> torch.Tensor:
    """[B·M] long: the image of each row of a [B, M] batch flattened."""
    return torch.arange(batch, device=device).repeat_interleave(rows)


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: where each owner's items begin."""
    return torch.cumsum(counts, 0) - counts


class QueryRows:
    """Where the rows of a packed query tensor sit in an image batch.

    A DGE block packs the queries of B images one image after the other into one
    [1, T, C] tensor, T = Σ_b M_b: every row-wise part of a block (norms, projections,
    MLP) runs on the T rows, with no padding. A part that needs the image batch (attention
    to the image's keys) pads the rows to [B, M, ...] (padding rows zero) with ``pad``, or
    to shorter ``segments``, and packs the result back with ``unpad``. Every size here is
    known on the host without reading ``counts`` (a device sync on a GPU): M is an upper
    bound of the images' row counts, not their maximum.

    Args:
        counts: [B] long, rows of each image.
        max_rows: M ≥ max_b M_b, a bound known on the host (one image: T).
        total: T.
    """

    def __init__(self, counts: torch.Tensor, max_rows: int, total: int):
        self.counts = counts
        self.total = total
        self.max_rows = total if counts.shape[0] == 1 else max_rows

    @property
    def batch(self) -> int:
        return self.counts.shape[0]

    @functools.cached_property
    def starts(self) -> torch.Tensor:
        """[B] long: the first packed row of each image."""
        return _starts(self.counts)

    @functools.cached_property
    def image_index(self) -> torch.Tensor:
        """[T] long: the image of each row."""
        return _owners(self.counts, self.total)

    @functools.cached_property
    def padded_index(self) -> Optional[torch.Tensor]:
        """[T] long: the row of each packed row in the flat padded [B*M] batch; None when
        there is no padding (the packed rows already are that batch)."""
        if self.total == self.batch * self.max_rows:  # every image has M rows (M ≥ each count)
            return None
        image = self.image_index
        return torch.arange(self.total, device=image.device) + (image * self.max_rows - self.starts[image])

    def segment_length(self) -> int:
        """L = max(MIN_SEGMENT_ROWS, ceil(T / (B · SEGMENTS_PER_IMAGE))): about an eighth of an
        image's mean row count, from host sizes only."""
        per_image = -(-self.total // self.batch)
        return max(MIN_SEGMENT_ROWS, -(-per_image // SEGMENTS_PER_IMAGE))

    def segments(self):
        """The rows cut into segments that each belong to one image, for attention that pads:
        -> (QueryRows whose "images" are the segments, [S] long image of each segment), or
        (self, None) when the images are padded whole (no padding at all, or M ≤ L). An image
        of M_b rows has ceil(M_b / L) segments of L rows (its last one may be shorter), so it
        pads fewer than L rows instead of up to M; each segment needs its image's keys (a
        copy of them). S = floor((T + B(L - 1)) / L) bounds Σ_b ceil(M_b / L) from host sizes:
        up to B - 1 trailing segments have no rows (all padding, dropped by ``unpad``)."""
        length = self.segment_length()
        if self.padded_index is None or length >= self.max_rows:
            return self, None
        per_image = (self.counts + length - 1) // length
        num_segments = (self.total + self.batch * (length - 1)) // length
        position = torch.arange(num_segments, device=self.counts.device)
        last = torch.cumsum(per_image, 0)
        images = torch.searchsorted(last, position, right=True).clamp_(max=self.batch - 1)
        done = (position - (last - per_image)[images]) * length  # rows of the image in earlier segments
        counts = torch.clamp(self.counts[images] - done, min=0, max=length)
        return QueryRows(counts, length, self.total), images

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, *] -> [B, M, *], padding rows zero."""
        tail = rows.shape[1:]
        if self.padded_index is None:
            return rows.reshape(self.batch, self.max_rows, *tail)
        padded = rows.new_zeros((self.batch * self.max_rows,) + tail)
        return padded.index_copy(0, self.padded_index, rows).view(self.batch, self.max_rows, *tail)

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, M, *] -> [T, *]."""
        flat = padded.reshape((self.batch * self.max_rows,) + padded.shape[2:])
        return flat if self.padded_index is None else flat.index_select(0, self.padded_index)
