"""What each DGE block decided in one forward, handed to the caller of that forward.

A DGE block appends its ``RoutingInfo`` to every ``RoutingRecord`` opened by
``record_routing()`` around the call. The records live in a context variable, so each
thread (and each asyncio task) sees only the forwards it runs itself: one model shared by
several threads gives each call its own routing. Nothing is kept on the modules.

    with record_routing() as record:
        features = backbone(images)
    beta = complexity_report(record).beta
"""
import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
from torch import nn

from .protocol import BlockCost

__all__ = ["RoutingInfo", "RoutingRecord", "record_routing", "add_routing", "routing_recorded"]


@dataclass
class RoutingInfo:
    """What one forward of a DGE block decided, and what it cost.

    Attributes:
        granularity_map: [B, Hr, Wr] long, φ chosen per region.
        num_queries: [B] long, spatial queries per image (extra tokens excluded).
        query_count: [B] float32 ψ of Eq. 7: forward the hard count, backward the
            straight-through soft count Σ p_i·n_i (differentiable in training).
        hw: (H, W) of the feature map; num_extra: E extra tokens.
        router_flops: multiply-adds of the router (0 when the map was given).
        block_cost: the block's ``BlockCost`` (``dge.layers.protocol``) at this map size.
    """

    granularity_map: torch.Tensor
    num_queries: torch.Tensor
    query_count: torch.Tensor
    hw: Tuple[int, int]
    num_extra: int
    router_flops: float
    block_cost: BlockCost

    @property
    def num_tokens(self) -> int:
        return self.hw[0] * self.hw[1]

    def dynamic_flops(self) -> torch.Tensor:
        """[B] multiply-adds of this DGE block per image (router included)."""
        cost = self.block_cost
        return cost.fixed + self.router_flops + cost.per_query * (self.query_count + self.num_extra)

    def static_flops(self) -> float:
        """Multiply-adds of the vanilla block on the same input."""
        cost = self.block_cost
        return cost.fixed + cost.vanilla_delta + cost.per_query * (self.num_tokens + self.num_extra)


class RoutingRecord:
    """The ``RoutingInfo`` of every DGE block call inside one ``record_routing()``, in call
    order (a block called twice appears twice)."""

    def __init__(self):
        self.blocks: List[nn.Module] = []
        self.infos: List[RoutingInfo] = []

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self) -> Iterator[Tuple[nn.Module, RoutingInfo]]:
        return iter(zip(self.blocks, self.infos))

    def of(self, block: nn.Module) -> RoutingInfo:
        """The last routing of ``block`` in this record; KeyError if it did not run."""
        for b, info in zip(reversed(self.blocks), reversed(self.infos)):
            if b is block:
                return info
        raise KeyError(f"the DGE block {type(block).__name__} did not run inside this record_routing()")


_OPEN: contextvars.ContextVar = contextvars.ContextVar("dge_routing_records", default=())


@contextlib.contextmanager
def record_routing() -> Iterator[RoutingRecord]:
    """Opens a ``RoutingRecord`` for the forwards run inside the block (nested records each
    receive every call)."""
    record = RoutingRecord()
    token = _OPEN.set(_OPEN.get() + (record,))
    try:
        yield record
    finally:
        _OPEN.reset(token)


def routing_recorded() -> bool:
    """Whether a ``record_routing()`` is open here: a DGE block accounts its routing only
    then (nothing else can read it)."""
    return bool(_OPEN.get())


def add_routing(block: nn.Module, info: RoutingInfo) -> None:
    """Called by a DGE block at the end of its forward: ``info`` goes to every open record."""
    for record in _OPEN.get():
        record.blocks.append(block)
        record.infos.append(info)
