"""Windowed attention and decomposed relative positions for pooled queries (ViTDet / SAM).

A windowed block attends within W×W windows of the (zero-padded) token map. Under DGE each
pooled query lies in one window (the region size divides W, so regions tile windows) and
attends to that window's dense keys and values. The queries of all windows sit in a buffer
of W² rows per window, each at the slot of the token under its centre (queries of one
image never share a token): the attention of every window is one dense batched call, the
same shapes as the vanilla block's, and the row-wise work (projections, MLP) stays on the
queries alone.

Relative positions (MViTv2's decomposed bias, as ViTDet and SAM use it): the bias of a
query at (y, x) to a key at (i, j) is q·R_h[y - i] + q·R_w[x - j]. A pooled query's centre
is fractional; its bias is the linear interpolation of the table between the two whole
offsets around it, which is q·R at whole offsets (the vanilla block's) when the centre is
a token's.
"""
from typing import Optional, Tuple

import torch
from torch.nn import functional as F

__all__ = ["WindowRows", "window_rows", "resized_rel_pos", "rel_pos_bias"]


class WindowRows:
    """Where each query row sits in the window buffer [B·nW·W², *]: ``index`` [T] long, the
    buffer row of each query; ``centers`` [B·nW, W², 2] float32, each slot's query centre
    in its window's token units (slots without a query: 0)."""

    def __init__(self, index: torch.Tensor, num_windows: int, window: int):
        self.index = index
        self.centers: Optional[torch.Tensor] = None  # set by window_rows
        self.num_windows = num_windows  # B·nW
        self.window = window

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, *] -> [B·nW, W², *] (slots without a query zero)."""
        slots = self.window * self.window
        buffer = rows.new_zeros((self.num_windows * slots,) + rows.shape[1:])
        return buffer.index_copy(0, self.index, rows).view(self.num_windows, slots, *rows.shape[1:])

    def gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """[B·nW, W², *] -> [T, *]."""
        return buffer.reshape((-1,) + buffer.shape[2:]).index_select(0, self.index)


def window_rows(centers: torch.Tensor, images: torch.Tensor, batch: int, hw: Tuple[int, int], window: int):
    """The window buffer of T query rows: ``centers`` [T, 2] (y, x) in token units (token
    (i, j) centred at (i + 0.5, j + 0.5)), ``images`` [T] long, their images' indices."""
    wy, wx = -(-hw[0] // window), -(-hw[1] // window)  # windows of the padded map
    token = centers.floor().long()  # the token under the centre: inside the query's region
    win = token.div(window, rounding_mode="floor")
    slot = token.remainder(window)
    windex = (images * wy + win[:, 0]) * wx + win[:, 1]
    index = windex * (window * window) + slot[:, 0] * window + slot[:, 1]
    local = (centers - win.to(centers.dtype) * window).float()
    rows = WindowRows(index, batch * wy * wx, window)
    rows.centers = rows.scatter(local)
    return rows


def resized_rel_pos(table: torch.Tensor, size: int) -> torch.Tensor:
    """A relative-position table [L, d] for ``size`` tokens a side: [2·size - 1, d], linearly
    resized when L differs (as ViTDet's and SAM's ``get_rel_pos``)."""
    length = 2 * size - 1
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.t()[None], size=length, mode="linear")
    return resized[0].t()


def rel_pos_bias(
    q: torch.Tensor, centers: torch.Tensor, tables: Tuple[torch.Tensor, torch.Tensor], key_hw: Tuple[int, int]
) -> torch.Tensor:
    """The decomposed relative-position bias of queries q [N, heads, M, d] at ``centers``
    [N, M, 2] (key-grid token units) to a key grid ``key_hw`` -> [N, heads, M, kh·kw] in q's
    dtype. ``tables``: (R_h, R_w), the block's tables for the grid's size."""
    kh, kw = key_hw
    th, tw = resized_rel_pos(tables[0], kh), resized_rel_pos(tables[1], kw)
    bh = _interpolated(q @ th.t().to(q.dtype), centers[..., 0] - 0.5, kh)
    bw = _interpolated(q @ tw.t().to(q.dtype), centers[..., 1] - 0.5, kw)
    return (bh[..., :, None] + bw[..., None, :]).flatten(-2)


def _interpolated(scores: torch.Tensor, pos: torch.Tensor, keys: int) -> torch.Tensor:
    """q·R at every whole offset [N, heads, M, 2k - 1] -> [N, heads, M, k]: at fractional
    positions ``pos`` [N, M] (key units), linear between the offsets around each."""
    below = pos.floor()
    frac = (pos - below).to(scores.dtype)[:, None, :, None]
    offset = below.long()[..., None] - torch.arange(keys, device=pos.device) + (keys - 1)  # [N, M, k]
    n, heads = scores.shape[:2]

    def at(index: torch.Tensor) -> torch.Tensor:
        index = index.clamp(0, 2 * keys - 2)[:, None].expand(n, heads, -1, -1)
        return scores.gather(-1, index)

    return at(offset) * (1.0 - frac) + at(offset + 1) * frac

