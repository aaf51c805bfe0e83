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
from typing import Callable, Optional, Tuple, Union

import torch
from torch.nn import functional as F

from .kernels import sdpa

__all__ = [
    "WindowRows",
    "partition_windows",
    "window_rows",
    "windowed_attention",
    "resized_rel_pos",
    "rel_pos_bias",
]

Window = Tuple[int, int]  # (Wh, Ww) tokens


def _pair(window: Union[int, Window]) -> Window:
    return (window, window) if isinstance(window, int) else tuple(window)


class WindowRows:
    """Where each query row sits in the window buffer [B·nW·Wh·Ww, *]: ``index`` [T] long,
    the buffer row of each query; ``centers`` [B·nW, Wh·Ww, 2] float32, each slot's query
    centre in its window's token units (slots without a query: 0)."""

    def __init__(self, index: torch.Tensor, num_windows: int, window: Window):
        self.index = index
        self.centers: Optional[torch.Tensor] = None  # set by window_rows
        self.num_windows = num_windows  # B·nW
        self.window = window

    @property
    def slots(self) -> int:
        return self.window[0] * self.window[1]

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """[T, *] -> [B·nW, Wh·Ww, *] (slots without a query zero)."""
        buffer = rows.new_zeros((self.num_windows * self.slots,) + rows.shape[1:])
        return buffer.index_copy(0, self.index, rows).view(self.num_windows, self.slots, *rows.shape[1:])

    def gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """[B·nW, Wh·Ww, *] -> [T, *]."""
        return buffer.reshape((-1,) + buffer.shape[2:]).index_select(0, self.index)


def window_rows(centers: torch.Tensor, images: torch.Tensor, batch: int, hw: Tuple[int, int], window) -> WindowRows:
    """The window buffer of T query rows: ``centers`` [T, 2] (y, x) in token units (token
    (i, j) centred at (i + 0.5, j + 0.5)), ``images`` [T] long, their images' indices;
    ``window``: W or (Wh, Ww)."""
    (wh, ww) = window = _pair(window)
    wy, wx = -(-hw[0] // wh), -(-hw[1] // ww)  # windows of the padded map
    ty, tx = centers.floor().long().unbind(-1)  # the token under the centre: inside the query's region
    win_y, win_x = ty.div(wh, rounding_mode="floor"), tx.div(ww, rounding_mode="floor")
    origin = torch.stack([win_y * wh, win_x * ww], dim=-1)
    windex = (images * wy + win_y) * wx + win_x
    index = windex * (wh * ww) + (ty - win_y * wh) * ww + (tx - win_x * ww)
    rows = WindowRows(index, batch * wy * wx, window)
    rows.centers = rows.scatter((centers - origin.to(centers.dtype)).float())
    return rows


def partition_windows(tokens: torch.Tensor, hw: Tuple[int, int], window) -> torch.Tensor:
    """tokens [B, H*W, C] -> [B·nW, Wh·Ww, C]: the Wh×Ww windows of the map zero-padded at the
    bottom / right, row-major (SAM's, Swin's and Hiera's partition)."""
    (wh, ww), (h, w) = _pair(window), hw
    b, c = tokens.shape[0], tokens.shape[-1]
    x = F.pad(tokens.view(b, h, w, c), (0, 0, 0, -w % ww, 0, -h % wh))
    hp, wp = x.shape[1], x.shape[2]
    x = x.view(b, hp // wh, wh, wp // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


BiasFn = Callable[[torch.Tensor, WindowRows], torch.Tensor]


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    place: WindowRows,
    heads: int,
    dropout: float = 0.0,
    bias: Optional[BiasFn] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Each query row q [T, A] against its window's keys and values k, v [B·nW, Wh·Ww, A]
    (``partition_windows`` of the projected context): the queries in their slots
    (``place``), one dense attention call for all windows, the same shapes as the vanilla
    block's -> [T, A]. ``bias(q_slots [B·nW, heads, Wh·Ww, d], place)`` gives an additive
    [B·nW, heads, Wh·Ww, Wh·Ww] mask (relative positions, a shifted window's sub-windows)."""
    n, a = place.slots, q.shape[-1]

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], n, heads, a // heads).transpose(1, 2)

    qs = split(place.scatter(q))
    x = sdpa(qs, split(k), split(v), dropout, bias(qs, place) if bias is not None else None, scale)
    # a copy in the contiguous layout: ONNX's decomposition of biased SDPA strides its output
    # otherwise than export recorded, and a reshape recorded as a view then fails
    x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(x.shape[0], n, a)
    return place.gather(x)


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

