"""Grained pooling and un-pooling (Eq. 3): regions, patches, queries and their inverse.

Terms (token units of the H×W feature map, padded bottom/right to Hp×Wp, footnote 3):

* region: an Rh×Rw window (S×S for region-wise routing, the whole padded map for
  layer-wise routing); each region gets one granularity φ from Φ;
* patch: a φ×φ window inside a region; it becomes one query, the mean of its *valid*
  (unpadded) tokens, centred at the mean of their centres. Patches entirely in padding
  make no query, so an all-φ=1 layout has exactly the H·W queries of the vanilla block;
* φ = 0: the region makes no query and its tokens pass through unchanged.

``StaticLayout`` holds everything that depends only on (H, W, Φ, region size): built once
per feature-map size and cached. ``pack_queries`` / ``unpack_tokens`` do the per-batch
work with index arithmetic on whole tensors: no loop over images or regions. The queries of
a batch are packed row after row (``QueryRows``): images with fewer queries do less work,
also in a batch (only attention pads, per short segment of one image's rows).
"""
import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

__all__ = [
    "StaticLayout",
    "static_layout",
    "token_centers",
    "PatchPooler",
    "QueryRows",
    "QueryPacking",
    "pack_queries",
    "gather_queries",
    "unpack_tokens",
]


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass
class PatchGrid:
    """Patches of one granularity φ over the padded map; indices are row-major in the
    (Hp/φ)×(Wp/φ) grid."""

    granularity: int
    grid_hw: Tuple[int, int]
    valid: torch.Tensor  # [Gh*Gw] bool: patches with >= 1 valid token
    centers: torch.Tensor  # [Gh*Gw, 2] float: (y, x) mean of valid token centres
    patch_region: torch.Tensor  # [Gh*Gw] long: region of each patch
    token_patch: torch.Tensor  # [H*W] long: patch of each token
    region_num_patches: torch.Tensor  # [R] float: valid patches per region
    pooled_index: torch.Tensor  # [Gh*Gw] long: row of a valid patch in PatchPooler[φ] (0 if invalid)
    pooled_size: int  # rows of PatchPooler[φ] per image: ceil(H/φ)·ceil(W/φ)


@dataclass
class StaticLayout:
    hw: Tuple[int, int]
    region_hw: Tuple[int, int]  # (Rh, Rw) tokens per region
    regions_hw: Tuple[int, int]  # (Hr, Wr) regions
    token_region: torch.Tensor  # [H*W] long
    token_centers: torch.Tensor  # [H*W, 2] float (y, x), see token_centers()
    grids: Dict[int, PatchGrid]  # nonzero φ -> its patches

    @property
    def num_regions(self) -> int:
        return self.regions_hw[0] * self.regions_hw[1]


def token_centers(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h*w, 2] (y, x) centres of the tokens of an h×w map: token (i, j) covers
    [i, i+1)×[j, j+1) and is centred at (i + 0.5, j + 0.5)."""
    ys = torch.arange(h, device=device, dtype=dtype) + 0.5
    xs = torch.arange(w, device=device, dtype=dtype) + 0.5
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


@functools.lru_cache(maxsize=128)
def static_layout(
    h: int, w: int, granularities: Tuple[int, ...], region_size: Optional[int], device: torch.device
) -> StaticLayout:
    """The layout of an h×w map for the nonzero ``granularities``; ``region_size`` None means
    one region covering the whole map (layer-wise routing), padded to max(Φ)."""
    nonzero = [g for g in granularities if g > 0]
    if region_size is None:
        unit = max(nonzero) if nonzero else 1
        hp, wp = _ceil_to(h, unit), _ceil_to(w, unit)
        rh, rw = hp, wp
    else:
        hp, wp = _ceil_to(h, region_size), _ceil_to(w, region_size)
        rh = rw = region_size
    hr, wr = hp // rh, wp // rw
    ii = torch.arange(h, device=device)
    jj = torch.arange(w, device=device)
    token_region = ((ii[:, None] // rh) * wr + (jj[None, :] // rw)).reshape(-1)

    grids = {}
    for g in nonzero:
        gh, gw = hp // g, wp // g
        # Valid tokens per patch along each axis, then their centre (mean of i + 0.5).
        py = torch.arange(gh, device=device)
        px = torch.arange(gw, device=device)
        ny = (torch.clamp(h - py * g, min=0, max=g)).to(torch.float32)
        nx = (torch.clamp(w - px * g, min=0, max=g)).to(torch.float32)
        cy = py * g + ny / 2.0
        cx = px * g + nx / 2.0
        centers = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), dim=-1).reshape(-1, 2)
        patch_region = ((py[:, None] * g // rh) * wr + (px[None, :] * g // rw)).reshape(-1)
        valid = (ny[:, None] * nx[None, :]).reshape(-1) > 0
        token_patch = ((ii[:, None] // g) * gw + (jj[None, :] // g)).reshape(-1)
        region_num_patches = torch.bincount(patch_region[valid], minlength=hr * wr).to(torch.float32)
        # PatchPooler[g] holds the unpadded ceil(h/g)×ceil(w/g) grid: a valid patch (py, px)
        # is its row py·ceil(w/g) + px.
        pooled_w = -(-w // g)
        pooled_index = torch.where(valid, (py[:, None] * pooled_w + px[None, :]).reshape(-1), 0)
        grids[g] = PatchGrid(
            granularity=g,
            grid_hw=(gh, gw),
            valid=valid,
            centers=centers,
            patch_region=patch_region,
            token_patch=token_patch,
            region_num_patches=region_num_patches,
            pooled_index=pooled_index,
            pooled_size=-(-h // g) * pooled_w,
        )
    return StaticLayout(
        hw=(h, w),
        region_hw=(rh, rw),
        regions_hw=(hr, wr),
        token_region=token_region,
        token_centers=token_centers(h, w, device),
        grids=grids,
    )


class PatchPooler:
    """Patch means of ``x`` over valid tokens, computed on demand and cached per patch size.

    ``pooler[s]`` is [B, ceil(H/s)·ceil(W/s), C]: the means of the s×s patches of the
    *unpadded* map (s = 1 is ``x`` itself). Pooling runs as ``avg_pool2d`` with
    ``ceil_mode`` on a channels-last view of the tokens, one pass per size: a patch that
    crosses the bottom/right border averages its valid tokens only (no padded copy).
    """

    def __init__(self, x: torch.Tensor, layout: StaticLayout):
        b, n, c = x.shape
        h, w = layout.hw
        self._map = x.reshape(b, h, w, c)
        self._means: Dict[int, torch.Tensor] = {1: x}

    def __getitem__(self, size: int) -> torch.Tensor:
        if size not in self._means:
            b, _, _, c = self._map.shape
            mean = F.avg_pool2d(self._map.permute(0, 3, 1, 2), size, ceil_mode=True)
            self._means[size] = mean.permute(0, 2, 3, 1).reshape(b, -1, c)
        return self._means[size]


# Attention on packed rows of images with different query counts pads per segment of at
# least MIN_SEGMENT_ROWS and at most ceil(M / SEGMENTS_PER_IMAGE) rows (see QueryRows.segments).
SEGMENTS_PER_IMAGE = 8
MIN_SEGMENT_ROWS = 256


def _owners(counts: torch.Tensor, total: int) -> torch.Tensor:
    """[total] long: i repeated counts[i] times (the owner of each of ``total`` items)."""
    return torch.arange(counts.shape[0], device=counts.device).repeat_interleave(counts, output_size=total)


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """Exclusive cumulative sum: where each owner's items begin."""
    return torch.cumsum(counts, 0) - counts


@dataclass
class QueryRows:
    """Where the rows of a packed query tensor sit in an image batch.

    A DGE block packs the queries of B images one image after the other into one
    [1, T, C] tensor, T = Σ_b M_b: every row-wise part of a block (norms, projections,
    MLP) runs on the T rows, with no padding. A part that needs the image batch (attention
    to the image's keys) pads the rows to [B, M, ...] (M = max_b M_b, padding rows zero)
    with ``pad``, or to shorter ``segments``, and packs the result back with ``unpad``.
    When every image has M rows the two are views (no copy).
    """

    counts: torch.Tensor  # [B] long, rows of each image
    max_rows: int  # M
    total: int  # T

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
        if self.total == self.batch * self.max_rows:
            return None
        image = self.image_index
        return torch.arange(self.total, device=image.device) + (image * self.max_rows - self.starts[image])

    def segments(self):
        """The rows cut into segments that each belong to one image, for attention that pads:
        -> (QueryRows whose "images" are the segments, [S] long image of each segment), or
        (self, None) when each image is one segment. Segments have L = max(MIN_SEGMENT_ROWS,
        ceil(M / SEGMENTS_PER_IMAGE)) rows (an image's last one may be shorter), so an image
        pads fewer than L rows instead of up to M; each segment needs its image's keys (a
        copy of them)."""
        if self.padded_index is None:
            return self, None
        length = max(MIN_SEGMENT_ROWS, -(-self.max_rows // SEGMENTS_PER_IMAGE))
        if length >= self.max_rows:  # one segment per image: the images' own keys
            return self, None
        per_image = (self.counts + length - 1) // length
        num_segments = int(per_image.sum())
        images = _owners(per_image, num_segments)
        first = _starts(per_image)  # first segment of each image
        done = (torch.arange(num_segments, device=images.device) - first[images]) * length
        counts = torch.clamp(self.counts[images] - done, max=length)
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


@dataclass
class QueryPacking:
    """Where each image's queries sit in the packed query rows, and each token's query.

    Rows are packed image after image; image b's segment holds its E extra tokens (e.g. a
    class token), then its spatial queries."""

    num_queries: torch.Tensor  # [B] long, spatial queries per image
    max_queries: int  # max_b num_queries
    # (φ, flat rows of PatchPooler[φ], patch indices in the padded grid, packed dest rows)
    sources: List[Tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    token_rows: torch.Tensor  # [B*H*W] long packed row of each token's query (T for φ = 0)
    query_regions: torch.Tensor  # [T] long: b*R + region of each row (b*R for extra tokens)
    extra_rows: torch.Tensor  # [B*E] long packed rows of the extra tokens
    rows: QueryRows
    has_skipped: bool  # some tokens have φ = 0 (their row is the extra zero row T)


def pack_queries(
    layout: StaticLayout, region_granularity: torch.Tensor, granularities: Sequence[int], num_extra: int = 0
) -> QueryPacking:
    """Index plan for a batch.

    Args:
        region_granularity: [B, R] long, φ chosen for each region.
        granularities: Φ.
        num_extra: E extra tokens per image, placed first in each image's segment.
    """
    b = region_granularity.shape[0]
    n = layout.token_region.numel()
    device = region_granularity.device
    token_granularity = region_granularity[:, layout.token_region]  # [B, H*W]
    order = [g for g in granularities if g > 0]
    # A patch becomes a query when its region chose its granularity and it has a valid token.
    selected = [
        (region_granularity[:, layout.grids[g].patch_region] == g) & layout.grids[g].valid
        for g in order
    ]
    sel_all = torch.cat(selected, dim=1)  # [B, T_patches]
    num_queries = sel_all.sum(dim=1)
    counts = num_queries + num_extra
    limits = torch.stack([num_queries.max(), counts.sum()]).tolist()  # one device sync
    max_queries, total = int(limits[0]), int(limits[1])
    query_rows = QueryRows(counts, max_queries + num_extra, total)
    # Packed row of each selected patch: its image's segment, after the extra tokens.
    pos = torch.cumsum(sel_all, dim=1) + (query_rows.starts + (num_extra - 1))[:, None]

    sources = []
    offset = 0
    token_rows = torch.full((b, n), total, dtype=torch.long, device=device)
    query_regions = query_rows.image_index * layout.num_regions  # + the region, below
    for g, sel in zip(order, selected):
        grid = layout.grids[g]
        t = sel.shape[1]
        bi, pi = sel.nonzero(as_tuple=True)
        dest = pos[bi, offset + pi]
        sources.append((g, bi * grid.pooled_size + grid.pooled_index[pi], pi, dest))
        query_regions.index_add_(0, dest, grid.patch_region[pi])
        rows = pos[:, offset:offset + t].gather(1, grid.token_patch[None].expand(b, n))
        token_rows = torch.where(token_granularity == g, rows, token_rows)
        offset += t
    extra_rows = (query_rows.starts[:, None] + torch.arange(num_extra, device=device)).reshape(-1)
    has_skipped = 0 in granularities and bool((token_granularity == 0).any())
    return QueryPacking(
        num_queries=num_queries,
        max_queries=max_queries,
        sources=sources,
        token_rows=token_rows.view(-1),
        query_regions=query_regions,
        extra_rows=extra_rows,
        rows=query_rows,
        has_skipped=has_skipped,
    )


def gather_queries(
    packing: QueryPacking, pooled: "PatchPooler", layout: StaticLayout, extra: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed query rows [T, C] and their centres [T, 2] (extra tokens centred at 0).

    Args:
        extra: [B, E, C] the extra tokens (``num_extra`` of ``pack_queries``), or None.
    """
    any_pool = pooled[1]
    c = any_pool.shape[-1]
    # Every row is written below (extra tokens and queries): no zero fill.
    queries = any_pool.new_empty(packing.rows.total, c)
    q_centers = any_pool.new_empty(packing.rows.total, 2)
    if packing.extra_rows.numel():
        queries.index_copy_(0, packing.extra_rows, extra.reshape(-1, c))
        q_centers.index_fill_(0, packing.extra_rows, 0.0)
    for g, src, patches, dest in packing.sources:
        rows = pooled[g].reshape(-1, c)
        lo, hi = (dest[0].item(), dest[-1].item()) if dest.numel() else (0, -1)
        contiguous = hi - lo + 1 == dest.numel()
        if contiguous and not (torch.is_grad_enabled() and rows.requires_grad):
            # One contiguous block (e.g. batch 1 at inference): gather without a temporary.
            torch.index_select(rows, 0, src, out=queries[lo : hi + 1])
        else:
            queries.index_copy_(0, dest, rows.index_select(0, src))
        grid_centers = layout.grids[g].centers.to(any_pool.dtype)
        q_centers.index_copy_(0, dest, grid_centers.index_select(0, patches))
    return queries, q_centers


def unpack_tokens(x: torch.Tensor, delta: torch.Tensor, packing: QueryPacking) -> torch.Tensor:
    """Un-pooling with the residual: ``x + delta[query of each token]``.

    Args:
        x: [B, H*W, C] input tokens.
        delta: [T, C] (or [1, T, C]) per-row update (block output minus query).
    """
    b, n, c = x.shape
    flat = delta.reshape(-1, c)
    if packing.has_skipped:  # φ = 0 tokens read a zero row
        flat = torch.cat([flat, flat.new_zeros(1, c)], dim=0)
    return flat.index_select(0, packing.token_rows).view(b, n, c).add_(x)
