"""The block protocol: what a vanilla encoder block gives the Dynamic Grained Encoder.

``DynamicGrainedEncoder`` wraps any module that satisfies ``DGEBlock``: dge's own
``EncoderBlock`` (PVT, DPVT, DeiT) does natively; a timm block gets an adapter
(``dge.adapters``) that re-composes the block's own modules. The wrapper never looks
inside a block: the block says how its model calls it (``prepare``), runs its work on
pooled queries against the dense tokens (``forward_queries``) and names its cost
(``complexity``). Everything a family needs (rotary tables, windows, attention masks, maps
[B, H, W, C] instead of tokens) stays behind these three methods.
"""
from typing import Callable, NamedTuple, Optional, Protocol, Tuple, runtime_checkable

import torch

from .rows import QueryRows

__all__ = ["BlockCall", "BlockCost", "DGEBlock", "check_block_protocol"]


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class BlockCall(NamedTuple):
    """One call of a block, in the form the wrapper works on.

    Attributes:
        tokens: [B, E + H*W, C], the E extra tokens (class token, registers) first.
        hw: (H, W), the token map's size.
        run: ``forward_queries`` with this call's own arguments bound (e.g. EVA's rotary
            table): ``run(queries, context, hw, query_centers, rows)``.
        restore: the output [B, E + H*W, C] in the form the caller passed (e.g. back to a map
            [B, H, W, C]).
    """

    tokens: torch.Tensor
    hw: Tuple[int, int]
    run: Callable[..., torch.Tensor]
    restore: Callable[[torch.Tensor], torch.Tensor] = _unchanged


class BlockCost(NamedTuple):
    """A block's multiply-adds on one map size, fvcore's convention (LayerNorm 5 per element;
    softmax, GELU, rotations, additions 0).

    Attributes:
        fixed: what its DGE form computes whatever the queries (the key/value side).
        per_query: what each query costs.
        vanilla_delta: the vanilla block's cost minus its DGE form's at every token, where they
            differ (SAM's windows: the vanilla block also projects its padding tokens). The
            DGE form costs fixed + per_query · M for M queries, the vanilla block
            fixed + vanilla_delta + per_query · (H·W + E) (Eq. 7).
    """

    fixed: float
    per_query: float
    vanilla_delta: float = 0.0


@runtime_checkable
class DGEBlock(Protocol):
    """A vanilla encoder block, as ``DynamicGrainedEncoder`` uses it.

    Row-wise work (norms, projections, MLP) runs on the queries only; the key/value side
    runs on the dense context. All-φ=1 routing must give the block's own output exactly.

    A block whose work needs the dense map of its queries (a convolution between its rows)
    sets ``uses_query_map = True``: ``forward_queries`` then also gets ``query_map=``, a
    ``dge.layers.grained.QueryMap`` that puts its rows on the map and reads them back.
    """

    def prepare(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, **kwargs) -> BlockCall:
        """The model's call of the block, ``block(x, hw, **kwargs)`` or the block's own form
        (``blk(x)``, ``blk(x, rope=...)``, maps [B, H, W, C]), as a ``BlockCall``; refuses
        what it cannot run sparsely (e.g. an attention mask) with a ValueError."""
        ...

    def forward_queries(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
    ) -> torch.Tensor:
        """The block on ``queries`` [B, M, C] attending to the dense ``context`` [B, E + H*W, C]
        -> updated queries [B, M, C] (residuals inside). ``query_centers`` [B, M, 2] float32
        (y, x) in token units (token (i, j) at (i + 0.5, j + 0.5); extra tokens at 0). With
        ``rows`` the queries of B images are packed rows [1, T, C] (``QueryRows`` says whose)."""
        ...

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, ...]:
        """Its multiply-adds on an ``hw`` map with ``num_extra`` extra tokens: a ``BlockCost``,
        or (fixed, per_query) when the vanilla block costs what the DGE form costs at every
        token (Eq. 7)."""
        ...


def check_block_protocol(block: object) -> None:
    """A TypeError naming what ``block`` lacks of ``DGEBlock``."""
    if isinstance(block, DGEBlock):
        return
    missing = [name for name in ("prepare", "forward_queries", "complexity") if not callable(getattr(block, name, None))]
    raise TypeError(
        f"a DGE block wraps a block of the DGEBlock protocol (dge.layers.protocol); {type(block).__name__} "
        f"lacks {missing} (a timm block gets an adapter: dge.patch)"
    )
