"""Grained pooling and un-pooling (Eq. 3): regions, patches, queries and their inverse.

Terms (token units of the H×W feature map, padded bottom/right to Hp×Wp, footnote 3):

* region: an Rh×Rw window (S×S for region-wise routing, the whole padded map for
  layer-wise routing); each region gets one granularity φ from Φ;
* patch: a φ×φ window inside a region; it becomes one query, the mean of its *valid*
  (unpadded) tokens, centred at the mean of their centres. Patches entirely in padding
  make no query, so an all-φ=1 layout has exactly the H·W queries of the vanilla block;
* φ = 0: the region makes no query and its tokens pass through unchanged;
* slot: a place a query can come from: one of the E extra tokens (e.g. a class token,
  always a query) or one patch of one nonzero φ. ``StaticLayout.slots`` lists them all.

``StaticLayout`` holds everything that depends only on (H, W, Φ, region size, E): built
once per feature-map size and cached. ``pack_queries`` / ``gather_queries`` /
``unpack_tokens`` do the per-batch work as one tensor program: the data-dependent size (how
many queries each image keeps) comes from the shape of one ``nonzero`` over the selected
slots, never from a value the host reads. So the same code runs eagerly, under
``torch.jit.trace`` and under ``torch.export`` (the query count is a dynamic size there),
and that ``nonzero`` is the only value a block waits for from the device, at any batch
size (padding sizes are bounds computed from the total, not the per-image counts). The
queries of a batch are packed row after row (``dge.layers.rows.QueryRows``): images with fewer queries do
less work, also in a batch (only attention pads, per short segment of one image's rows).
"""
import functools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from .rows import QueryRows

__all__ = [
    "SlotTable",
    "StaticLayout",
    "static_layout",
    "token_centers",
    "PatchPooler",
    "QueryPacking",
    "pack_queries",
    "query_sources",
    "gather_queries",
    "unpack_tokens",
    "QueryMap",
]


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


EXTRA_TOKEN_CHOICE = -1  # the choice of the extra tokens' region R: always (every image "chooses" it)
PADDING_CHOICE = -2  # the choice of a patch wholly in padding: never chosen (it makes no query)


@dataclass
class SlotTable:
    """Every slot of a layout: the E extra tokens, then for each nonzero φ (in Φ's order)
    the patches of its (Hp/φ)×(Wp/φ) grid, row-major. S = E + Σ_φ (Hp/φ)(Wp/φ).

    A slot is a query of an image when the image's choice (index into Φ) of the slot's
    region equals ``choice``; extra tokens sit in region R, whose choice is always
    ``EXTRA_TOKEN_CHOICE``; patches wholly in padding have ``PADDING_CHOICE``.
    Queries are read from an image's *source rows*: its E + H·W tokens, then the means of
    each coarse φ's patches (``query_sources``)."""

    choice: torch.Tensor  # [S] long: index in Φ that selects the slot (or one of the two constants above)
    region: torch.Tensor  # [S] long: region of the slot (R for extra tokens)
    source: torch.Tensor  # [S] long: row of the slot's query among one image's source rows
    centers: torch.Tensor  # [S, 2] float (y, x): mean of the valid token centres (0 for extra tokens)
    num_sources: int  # source rows per image: E + H·W + Σ_{φ>1} ceil(H/φ)·ceil(W/φ)
    token_slot: torch.Tensor  # [K·H·W] long: row k·HW + t is token t's slot under choice k (0 for φ = 0)

    @property
    def num_slots(self) -> int:
        return self.choice.shape[0]


@dataclass
class StaticLayout:
    hw: Tuple[int, int]
    tokens_per_region: Tuple[int, int]  # (Rh, Rw): a region's size in tokens
    region_grid: Tuple[int, int]  # (Hr, Wr): the number of regions down and across
    num_extra: int  # E extra tokens
    skip_choice: Optional[int]  # index of φ = 0 in Φ, None when Φ has no 0
    token_region: torch.Tensor  # [H*W] long
    token_centers: torch.Tensor  # [H*W, 2] float (y, x), see token_centers()
    region_num_patches: torch.Tensor  # [K, R] float: valid patches of each region under each choice
    slots: SlotTable

    @property
    def num_regions(self) -> int:
        return self.region_grid[0] * self.region_grid[1]


def token_centers(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h*w, 2] (y, x) centres of the tokens of an h×w map: token (i, j) covers
    [i, i+1)×[j, j+1) and is centred at (i + 0.5, j + 0.5)."""
    ys = torch.arange(h, device=device, dtype=dtype) + 0.5
    xs = torch.arange(w, device=device, dtype=dtype) + 0.5
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


@dataclass(frozen=True)
class _Grid:
    """The padded map: h×w tokens padded to hp×wp, cut into regions of rh×rw tokens, hr×wr of them."""

    h: int
    w: int
    hp: int
    wp: int
    rh: int
    rw: int

    @property
    def region_grid(self) -> Tuple[int, int]:
        return self.hp // self.rh, self.wp // self.rw

    @property
    def num_regions(self) -> int:
        return self.region_grid[0] * self.region_grid[1]


def _grid(h: int, w: int, granularities: Tuple[int, ...], region_size: Optional[int]) -> _Grid:
    if region_size is None:  # one region: the map padded to max(Φ)
        unit = max([g for g in granularities if g > 0], default=1)
        hp, wp = _ceil_to(h, unit), _ceil_to(w, unit)
        return _Grid(h, w, hp, wp, hp, wp)
    return _Grid(h, w, _ceil_to(h, region_size), _ceil_to(w, region_size), region_size, region_size)


@dataclass
class _Patches:
    """The (hp/φ)×(wp/φ) patches of one φ > 0, row-major (P of them).

    Attributes:
        valid: [P] bool, the patch holds at least one unpadded token (it makes a query).
        centers: [P, 2] float32 (y, x), the mean of its valid tokens' centres.
        region: [P] long, the region it lies in.
        pooled_row: [P] long, its row in the φ-pooled unpadded map (ceil(h/φ)×ceil(w/φ)).
        token_patch: [h·w] long, the patch of each token.
    """

    valid: torch.Tensor
    centers: torch.Tensor
    region: torch.Tensor
    pooled_row: torch.Tensor
    token_patch: torch.Tensor


def _patches(grid: _Grid, g: int, device: torch.device) -> _Patches:
    gh, gw = grid.hp // g, grid.wp // g
    py, px = torch.arange(gh, device=device), torch.arange(gw, device=device)
    # Valid tokens per patch along each axis, then their centre (mean of i + 0.5).
    ny = torch.clamp(grid.h - py * g, min=0, max=g).to(torch.float32)
    nx = torch.clamp(grid.w - px * g, min=0, max=g).to(torch.float32)
    centers = torch.stack(torch.meshgrid(py * g + ny / 2.0, px * g + nx / 2.0, indexing="ij"), dim=-1)
    wr = grid.region_grid[1]
    ii, jj = torch.arange(grid.h, device=device), torch.arange(grid.w, device=device)
    return _Patches(
        valid=(ny[:, None] * nx[None, :]).reshape(-1) > 0,
        centers=centers.reshape(-1, 2),
        region=((py[:, None] * g // grid.rh) * wr + (px[None, :] * g // grid.rw)).reshape(-1),
        pooled_row=(py[:, None] * -(-grid.w // g) + px[None, :]).reshape(-1),
        token_patch=((ii[:, None] // g) * gw + (jj[None, :] // g)).reshape(-1),
    )


def _slot_table(grid: _Grid, granularities: Tuple[int, ...], num_extra: int, device) -> Tuple[SlotTable, torch.Tensor]:
    """(the slots: the extra tokens, then each φ > 0's patches; [K, R] valid patches of each
    region under each choice)."""
    n, r = grid.h * grid.w, grid.num_regions
    choice = [torch.full((num_extra,), EXTRA_TOKEN_CHOICE, dtype=torch.long, device=device)]
    region = [torch.full((num_extra,), r, dtype=torch.long, device=device)]  # region R
    source, centers = [torch.arange(num_extra, device=device)], [torch.zeros(num_extra, 2, device=device)]
    token_slot, region_num_patches = [], torch.zeros(len(granularities), r, device=device)
    first_slot, coarse_rows = num_extra, num_extra + n  # source rows: E extra, h·w tokens, then pooled maps
    for k, g in enumerate(granularities):
        if g == 0:  # never read: φ = 0 tokens take the zero row
            token_slot.append(torch.zeros(n, dtype=torch.long, device=device))
            continue
        patches = _patches(grid, g, device)
        choice.append(torch.where(patches.valid, k, PADDING_CHOICE))
        region.append(patches.region)
        centers.append(patches.centers)
        region_num_patches[k] = torch.bincount(patches.region[patches.valid], minlength=r).to(torch.float32)
        base = num_extra if g == 1 else coarse_rows  # φ = 1 patches are the tokens themselves
        source.append(torch.where(patches.valid, base + patches.pooled_row, 0))
        coarse_rows += -(-grid.h // g) * -(-grid.w // g) if g > 1 else 0
        token_slot.append(first_slot + patches.token_patch)
        first_slot += patches.valid.shape[0]
    cat = torch.cat
    table = SlotTable(cat(choice), cat(region), cat(source), cat(centers), coarse_rows, cat(token_slot))
    return table, region_num_patches


@functools.lru_cache(maxsize=128)
@torch.inference_mode(False)  # cached constants: never inference tensors, which autograd cannot save
def static_layout(
    h: int,
    w: int,
    granularities: Tuple[int, ...],
    region_size: Optional[int],
    device: torch.device,
    num_extra: int = 0,
) -> StaticLayout:
    """The layout of an h×w map (with ``num_extra`` leading extra tokens) for Φ =
    ``granularities``; ``region_size`` None means one region covering the whole map
    (layer-wise routing), padded to max(Φ)."""
    grid = _grid(h, w, granularities, region_size)
    ii, jj = torch.arange(h, device=device), torch.arange(w, device=device)
    token_region = ((ii[:, None] // grid.rh) * grid.region_grid[1] + (jj[None, :] // grid.rw)).reshape(-1)
    slots, region_num_patches = _slot_table(grid, granularities, num_extra, device)
    return StaticLayout(
        hw=(h, w),
        tokens_per_region=(grid.rh, grid.rw),
        region_grid=grid.region_grid,
        num_extra=num_extra,
        skip_choice=granularities.index(0) if 0 in granularities else None,
        token_region=token_region,
        token_centers=token_centers(h, w, device),
        region_num_patches=region_num_patches,
        slots=slots,
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


@dataclass
class QueryPacking:
    """Which slots of each image are queries, where they sit in the packed rows, and each
    token's query. Rows are packed image after image; image b's rows are its E extra
    tokens, then its spatial queries in slot order (φ after φ, patches row-major)."""

    layout: StaticLayout
    selected: torch.Tensor  # [B*S] long: flat index b·S + slot of each packed row, in row order
    rows: QueryRows
    row_of_slot: torch.Tensor  # [B*S] long: packed row of each selected slot (others: the next row)
    token_rows: torch.Tensor  # [B*H*W] long: packed row of each token's query (T: the zero row, φ = 0)
    num_queries: torch.Tensor  # [B] long, spatial queries per image

    @property
    def batch(self) -> int:
        return self.rows.batch

    def slot_index(self) -> torch.Tensor:
        """[T] long: the slot of each row."""
        s = self.layout.slots.num_slots
        return self.selected if self.batch == 1 else self.selected.remainder(s)

    def image_offsets(self, per_image: int) -> Optional[torch.Tensor]:
        """[T] long: image of each row × ``per_image`` (None for one image)."""
        if self.batch == 1:
            return None
        return self.selected.div(self.layout.slots.num_slots, rounding_mode="floor") * per_image

    def query_regions(self) -> torch.Tensor:
        """[T] long: b·R + region of each row (the extra tokens' rows: b·R + R)."""
        regions = self.layout.slots.region.index_select(0, self.slot_index())
        offsets = self.image_offsets(self.layout.num_regions + 1)
        return regions if offsets is None else regions + offsets

    def extra_rows(self) -> torch.Tensor:
        """[B*E] long: packed rows of the extra tokens."""
        b, s, e = self.batch, self.layout.slots.num_slots, self.layout.num_extra
        return self.row_of_slot.view(b, s)[:, :e].reshape(-1)


def pack_queries(layout: StaticLayout, choice: torch.Tensor) -> QueryPacking:
    """Index plan for a batch, as a tensor program: its one host sync is the ``nonzero``, at
    any batch size.

    Args:
        choice: [B, R] long, index into Φ of the granularity chosen for each region.
    """
    b, n = choice.shape[0], layout.hw[0] * layout.hw[1]
    slots = layout.slots
    s = slots.num_slots
    # A slot is a query when its region chose its granularity (extra tokens: region R).
    with_extra = F.pad(choice, (0, 1), value=EXTRA_TOKEN_CHOICE)  # [B, R + 1]
    chosen = with_extra.index_select(1, slots.region) == slots.choice  # [B, S]
    selected = chosen.view(-1).nonzero().squeeze(1)  # [T]: the data-dependent size
    # Bounds of T for graph captures (torch.export): every image keeps its extra tokens and,
    # unless Φ has 0, at least one query per region; at most one per token.
    total = selected.shape[0]
    least = layout.num_extra + (layout.num_regions if layout.skip_choice is None else 0)
    if not torch.jit.is_tracing():  # (a trace may hold sizes as tensors)
        torch._check(total >= b * least)
        torch._check(total <= b * (layout.num_extra + n))
    # M, a bound of each image's row count known without reading the counts (one image: T).
    max_rows = total if b == 1 else min(layout.num_extra + n, total - (b - 1) * least)
    flat = chosen.view(-1).long()
    row_of_slot = torch.cumsum(flat, 0) - flat  # packed row of each selected slot (in 0..T)
    counts = chosen.sum(dim=1)
    # Each token reads the row of its patch under its region's choice.
    token_choice = choice.index_select(1, layout.token_region)  # [B, H*W]
    slot = slots.token_slot.view(-1, n).gather(0, token_choice)  # [B, H*W]
    if b > 1:
        slot = slot + torch.arange(0, b * s, s, device=choice.device)[:, None]
    token_rows = row_of_slot.index_select(0, slot.view(-1))
    if layout.skip_choice is not None:  # φ = 0 tokens read the zero row T
        token_rows = torch.where(token_choice.view(-1) == layout.skip_choice, counts.sum(), token_rows)
    return QueryPacking(
        layout=layout,
        selected=selected,
        rows=QueryRows(counts, max_rows, total),
        row_of_slot=row_of_slot,
        token_rows=token_rows,
        num_queries=counts - layout.num_extra,
    )


def query_sources(x: torch.Tensor, pooled: "PatchPooler", granularities: Sequence[int]) -> torch.Tensor:
    """[B*num_sources, C]: each image's source rows, image after image: its E + H·W tokens
    (``x``), then the patch means of each coarse φ in Φ's order."""
    b, _, c = x.shape
    coarse = [pooled[g] for g in granularities if g > 1]
    return (torch.cat([x] + coarse, dim=1) if coarse else x).reshape(-1, c)


def gather_queries(packing: QueryPacking, sources: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Packed query rows [T, C] and their centres [T, 2] float32 (extra tokens centred at 0).

    Args:
        sources: [B*num_sources, C] from ``query_sources``.
    """
    slots = packing.layout.slots
    slot = packing.slot_index()
    rows = slots.source.index_select(0, slot)
    offsets = packing.image_offsets(slots.num_sources)
    queries = sources.index_select(0, rows if offsets is None else rows + offsets)
    return queries, slots.centers.index_select(0, slot)


def unpack_tokens(x: torch.Tensor, delta: torch.Tensor, packing: QueryPacking) -> torch.Tensor:
    """Un-pooling with the residual: ``x + delta[query of each token]``.

    Args:
        x: [B, H*W, C] input tokens.
        delta: [T, C] (or [1, T, C]) per-row update (block output minus query).
    """
    b, n, c = x.shape
    flat = delta.reshape(-1, c)
    if packing.layout.skip_choice is not None:  # φ = 0 tokens read a zero row
        flat = torch.cat([flat, flat.new_zeros(1, c)], dim=0)
    return flat.index_select(0, packing.token_rows).view(b, n, c).add_(x)


class QueryMap:
    """Where the query rows of one block call lie on the token map, for block work that needs
    the dense map (PVT v2's depthwise convolution): ``to_map`` gives every token its query's
    row (0 where a region is skipped), ``from_map`` every query the mean of its patch's tokens
    (the extra tokens' rows 0), the pooling that made the queries. The Dynamic Grained Encoder
    passes one to blocks whose ``uses_query_map`` is true. ``packing`` None: every token its own
    query, in a [B, E + H·W] batch."""

    def __init__(self, layout: StaticLayout, packing: Optional[QueryPacking], batch: int, granularities):
        self.layout, self.packing, self.batch, self.granularities = layout, packing, batch, tuple(granularities)

    def to_map(self, rows: torch.Tensor) -> torch.Tensor:
        """Query rows [B', M, D] of the call -> [B, H*W, D]."""
        e, n = self.layout.num_extra, self.layout.hw[0] * self.layout.hw[1]
        if self.packing is None:
            return rows[:, e:]
        flat = rows.reshape(-1, rows.shape[-1])
        if self.layout.skip_choice is not None:  # φ = 0 tokens read a zero row
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])], dim=0)
        return flat.index_select(0, self.packing.token_rows).view(self.batch, n, -1)

    def from_map(self, dense: torch.Tensor) -> torch.Tensor:
        """A map [B, H*W, D] -> [T, D]: the rows of the call's queries, in its order."""
        e = self.layout.num_extra
        full = F.pad(dense, (0, 0, e, 0)) if e else dense  # (a pad by 0 would copy the map)
        if self.packing is None:
            return full.reshape(-1, dense.shape[-1])
        sources = query_sources(full, PatchPooler(dense, self.layout), self.granularities)
        return gather_queries(self.packing, sources)[0]
