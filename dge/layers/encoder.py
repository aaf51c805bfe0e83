"""The Dynamic Grained Encoder (Sec. 3.2): sparse queries for any vanilla encoder block."""
import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, Union

import torch
from timm.models import register_notrace_module
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .grained import (
    PatchPooler,
    QueryMap,
    StaticLayout,
    gather_queries,
    pack_queries,
    query_sources,
    static_layout,
    unpack_tokens,
)
from .keys import map_block_keys
from .options import DGEOptions
from .protocol import BlockCall, BlockCost, check_block_protocol
from .router import GrainedRouter
from .saved_options import check_loaded_options, encode_options
from .routing import RoutingInfo, add_routing, routing_recorded

__all__ = [
    "DynamicGrainedEncoder",
    "ACCOUNTING_DTYPE",
    "GranularityMap",
    "is_capturing",
    "specialize_to_input",
]

# Query counts, FLOPs and β are summed in float32 whatever the activations are (a block's
# multiply-adds, ~1e9, overflow float16; bfloat16 keeps 8 bits). float64 would fail on MPS.
ACCOUNTING_DTYPE = torch.float32
# A fixed routing: [B, Hr, Wr] long values in Φ, or a function of the region grid (Hr, Wr)
# giving one ([Hr, Wr]: every image the same).
GranularityMap = Union[torch.Tensor, Callable[[Tuple[int, int]], torch.Tensor]]


def is_capturing() -> bool:
    """Whether the code runs under a graph capture (``torch.jit.trace``, ``torch.export``,
    ``torch.compile``): then nothing may depend on a tensor's value on the host."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@contextlib.contextmanager
def specialize_to_input(model: nn.Module) -> Iterator[None]:
    """While active, a trace of ``model``'s DGE blocks may take the eager shortcuts that
    depend on the traced input's routing (every query one token: the plain block; every
    region skipped: the identity), so that its graph is the one eager inference runs on that
    input. For analyses that trace each image on its own (fvcore's FLOP count), never for
    export: such a graph holds only for inputs that are routed the same."""
    blocks = [m for m in model.modules() if isinstance(m, DynamicGrainedEncoder)]
    previous = [m.specialized for m in blocks]
    for m in blocks:
        m.specialized = True
    try:
        yield
    finally:
        for m, value in zip(blocks, previous):
            m.specialized = value


@dataclass
class _Decision:
    """The granularity of each region in one forward.

    Attributes:
        index: [B, Hr, Wr] long, the chosen entry of Φ per region.
        phi: [K] long, Φ.
        probs: [B, Hr, Wr, K] float32 router scores, or None (a given map, or no router).
    """

    index: torch.Tensor
    phi: torch.Tensor
    probs: Optional[torch.Tensor] = None

    @property
    def granularity_map(self) -> torch.Tensor:
        """[B, Hr, Wr] long, φ of each region (read only when the routing is recorded)."""
        return self.phi[self.index]

    @property
    def choice(self) -> torch.Tensor:
        """[B, R] the index per region, regions in raster order."""
        return self.index.view(self.index.shape[0], -1)

    @property
    def chosen_p(self) -> Optional[torch.Tensor]:
        """[B, R] the score of the chosen entry (the straight-through factor of Eq. 6), or None."""
        if self.probs is None:
            return None
        return self.probs.gather(-1, self.index[..., None]).view(self.index.shape[0], -1)

    def patches(self, layout: StaticLayout) -> torch.Tensor:
        """[B, R] valid patches of the chosen granularity per region (ψ_i of Eq. 7)."""
        return torch.take_along_dim(layout.region_num_patches[None], self.choice[:, None], 1)[:, 0]


class DynamicGrainedEncoder(nn.Module):
    """Wraps a vanilla encoder block (``dge.layers.protocol.DGEBlock``) with a router that
    gives each S×S region one granularity φ ∈ Φ; the block runs on one pooled query per φ×φ
    patch against the dense input, and ``x + unpool(block(q, x) - q)`` is returned. It takes
    the vanilla block's own call (``dge(x, hw)`` for dge's blocks, timm's ``blk(x)``, ...):
    the block's ``prepare`` says what the call means.

    Args:
        block: the vanilla block (``DGEBlock`` protocol).
        dim: channels C.
        options: a ``DGEOptions`` (Φ, S, routing kind, τ, dense training, router
            initialisation), a mapping of its fields, or None (the defaults).
        num_extra_tokens: E leading tokens (e.g. a class token) that are always queries.

    Each forward hands its ``RoutingInfo`` to the open ``dge.layers.record_routing()``
    records of its caller; the module keeps none. ``specialized`` (set by
    ``specialize_to_input``) lets a trace take the eager shortcuts.
    """

    block_keys = "wrapped"  # loads vanilla checkpoints too: dge.layers.keys.map_block_keys

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        options: Union[None, Mapping[str, Any], DGEOptions] = None,
        num_extra_tokens: int = 0,
    ):
        super().__init__()
        check_block_protocol(block)
        self.options = options = DGEOptions.coerce(options) or DGEOptions()
        self.num_extra_tokens = num_extra_tokens
        self.specialized = False
        self._block_costs = {}  # (H, W) -> block.complexity: see block_cost
        self.block = block
        k = len(self.granularities)
        fine = self.granularities.index(min(g for g in self.granularities if g > 0))
        self.router = GrainedRouter(dim, k, fine_index=fine, init_fine_prob=options.init_fine_prob) if k > 1 else None
        self.register_buffer("_phi", torch.tensor(self.granularities), persistent=False)

    @property
    def granularities(self) -> Tuple[int, ...]:
        """Φ, ascending."""
        return self.options.granularities

    @property
    def region_size(self) -> int:
        """S: ``options.region_size``, or max(Φ)."""
        return self.options.region_size or max(self.options.granularities)

    @property
    def routing(self) -> str:
        return self.options.routing

    def extra_repr(self) -> str:
        return (
            f"granularities={self.granularities}, region_size={self.region_size}, "
            f"routing={self.routing}, gumbel_tau={self.options.gumbel_tau}, estimator={self.options.estimator}"
        )

    def get_extra_state(self) -> torch.Tensor:
        """The options the router's weights depend on, saved with them
        (``dge.layers.saved_options``)."""
        return encode_options(self.granularities, self.region_size, self.routing)

    def set_extra_state(self, state) -> None:
        pass  # checked against the file's in _load_from_state_dict; the options stay the block's

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        map_block_keys(state_dict, prefix, wrapped=True)  # a vanilla checkpoint: keys without "block."
        own_router = {} if self.router is None else self.router.state_dict(prefix=prefix + "router.")
        check_loaded_options(state_dict, prefix, self.get_extra_state(), own_router, error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs)

    # ------------------------------------------------------------------ routing
    def layout(self, hw: Tuple[int, int], device) -> StaticLayout:
        region = self.region_size if self.routing == "region" else None
        with unset_fake_temporarily():  # real tensors, also under torch.export: constants of its graph
            return static_layout(hw[0], hw[1], self.granularities, region, torch.device(device), self.num_extra_tokens)

    def _check_map(self, granularity_map: GranularityMap, batch: int, layout: StaticLayout) -> torch.Tensor:
        hr, wr = layout.region_grid
        if callable(granularity_map):
            granularity_map = torch.as_tensor(granularity_map((hr, wr)), device=self._phi.device)
            if granularity_map.dim() == 2:
                granularity_map = granularity_map.expand(batch, hr, wr).contiguous()
        if tuple(granularity_map.shape) != (batch, hr, wr):
            raise ValueError(
                f"granularity_map must have shape [B, Hr, Wr] = {[batch, hr, wr]}; "
                f"got {list(granularity_map.shape)}"
            )
        gmap = granularity_map.to(device=self._phi.device, dtype=torch.long)
        if not is_capturing() and not torch.isin(gmap, self._phi).all():
            bad = sorted(set(gmap.unique().tolist()) - set(self.granularities))
            raise ValueError(f"granularity_map values must be in {self.granularities}; got {bad}")
        return gmap

    def _route(self, spatial: torch.Tensor, pooled: PatchPooler, layout: StaticLayout):
        """-> (index [B, Hr, Wr], probs [B, Hr, Wr, K] or None)."""
        b, _, c = spatial.shape
        hr, wr = layout.region_grid
        if self.routing == "layer":
            region_means = spatial.mean(dim=1)
        else:
            region_means = pooled[self.region_size]
        logits = self.router(region_means.reshape(b, hr, wr, c))  # Eq. 1
        return GrainedRouter.select(logits, stochastic=self.training, tau=self.options.gumbel_tau)

    def _decide(self, x: torch.Tensor, pooled: PatchPooler, layout: StaticLayout, granularity_map) -> _Decision:
        """Step 1, route: the given map, the only choice, or the router's (Eq. 1-5)."""
        b = x.shape[0]
        if granularity_map is not None:
            gmap = self._check_map(granularity_map, b, layout)
            return _Decision(torch.searchsorted(self._phi, gmap), self._phi)  # Φ is ascending
        if self.router is None:
            return _Decision(self._phi.new_zeros((b,) + layout.region_grid), self._phi)
        index, probs = self._route(x[:, self.num_extra_tokens :], pooled, layout)
        return _Decision(index, self._phi, probs)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        hw: Optional[Tuple[int, int]] = None,
        granularity_map: Optional[GranularityMap] = None,
        **kwargs,
    ) -> torch.Tensor:
        """The block's call (``block.prepare(x, hw, **kwargs)``: for dge's blocks x [B, E + H*W,
        C] and hw) -> the output in the same form. ``granularity_map`` [B, Hr, Wr] (values in
        Φ), or a function of the region grid (Hr, Wr) giving one ([Hr, Wr] for every image),
        bypasses the router."""
        call = self.block.prepare(x, hw, **kwargs)
        return call.restore(self.encode(call, granularity_map))

    def encode(self, call: BlockCall, granularity_map: Optional[GranularityMap] = None) -> torch.Tensor:
        """Route, pack, run ``call.run`` on the queries, unpack, record: [B, E + H*W, C] tokens
        of ``call`` -> [B, E + H*W, C]."""
        x, hw, e = call.tokens, call.hw, self.num_extra_tokens
        if x.shape[1] != e + hw[0] * hw[1]:
            raise ValueError(f"expected E + H*W = {e} + {hw[0]}*{hw[1]} = {e + hw[0] * hw[1]} tokens; got {x.shape[1]}")
        layout = self.layout(hw, x.device)
        pooled = PatchPooler(x[:, e:], layout)
        decision = self._decide(x, pooled, layout, granularity_map)
        if self.training and self.options.estimator == "official" and decision.probs is not None:
            out = self._forward_dense(x, pooled, layout, decision, hw, call.run)
            num_queries = decision.patches(layout).sum(dim=1).long()
        else:
            out, num_queries = self._forward_sparse(x, pooled, layout, decision, hw, call.run)
        if routing_recorded():
            add_routing(self, self._account(decision, num_queries, layout, hw, routed=granularity_map is None))
        return out

    def _account(self, decision: _Decision, num_queries, layout: StaticLayout, hw, routed: bool) -> RoutingInfo:
        """Last step: the routing and its cost (Eq. 7), counted in ``ACCOUNTING_DTYPE``."""
        query_count = num_queries.to(ACCOUNTING_DTYPE)  # not the activation dtype: fp16 overflows a block's FLOPs
        if decision.probs is not None:  # routed in training: ψ is differentiable, straight-through
            soft = self._soft_count(decision, layout)
            query_count = query_count + soft - soft.detach()
        use_router = routed and self.router is not None
        return RoutingInfo(
            granularity_map=decision.granularity_map,
            num_queries=num_queries,
            query_count=query_count,
            hw=tuple(hw),
            num_extra=self.num_extra_tokens,
            router_flops=self.router.flops(layout.num_regions) if use_router else 0.0,
            block_cost=self.block_cost(tuple(hw)),
        )

    def block_cost(self, hw: Tuple[int, int]) -> BlockCost:
        """The block's ``BlockCost`` on an ``hw`` map: its ``complexity``, which depends on the
        map size only, kept per size (a block walks its modules for it)."""
        cost = self._block_costs.get(hw)
        if cost is None:
            cost = BlockCost(*self.block.complexity(hw, self.num_extra_tokens))
            if not is_capturing():
                self._block_costs[hw] = cost
        return cost

    def _soft_count(self, decision: _Decision, layout: StaticLayout) -> torch.Tensor:
        """[B] the differentiable query count: Σ over regions of p ψ of the chosen choice
        (Eq. 7), or of Σ_k p_k ψ_k over all K (the official estimators: the expected count
        under the straight-through one-hot gate)."""
        if self.options.estimator == "paper":
            return (decision.chosen_p * decision.patches(layout)).sum(dim=1)
        probs = decision.probs.view(decision.probs.shape[0], -1, decision.probs.shape[-1])  # [B, R, K]
        return (probs * layout.region_num_patches.t()).sum(dim=(1, 2))

    def _plain_block(self, x: torch.Tensor, hw: Tuple[int, int], layout: StaticLayout, run) -> torch.Tensor:
        """The vanilla block on every token (what all-φ=1 routing computes)."""
        b, e = x.shape[0], self.num_extra_tokens
        centers = layout.token_centers.expand(b, -1, -1)  # float32 in any dtype (positions)
        if e:
            centers = torch.cat([centers.new_zeros(b, e, 2), centers], dim=1)
        return run(x, x, hw, centers, **self._map_args(layout, None, b))

    def _map_args(self, layout: StaticLayout, packing, batch: int) -> dict:
        """``query_map=`` for a block whose work needs the dense map of its queries
        (``uses_query_map``), else nothing."""
        if not getattr(self.block, "uses_query_map", False):
            return {}
        return {"query_map": QueryMap(layout, packing, batch, self.granularities)}

    def _check_capture(self, batch: int, layout: StaticLayout) -> None:
        """What a graph capture of this block cannot take (eager runs it all)."""
        if batch > 1:
            raise RuntimeError(
                f"a DGE block is traced or exported at batch 1 only (attention pads a batch by the "
                f"image with most queries, a size read from the device); got batch {batch}"
            )
        if layout.skip_choice is not None and self.num_extra_tokens == 0 and torch.compiler.is_compiling():
            raise RuntimeError(
                f"a DGE block with 0 in its granularities {self.granularities} and no extra token is not "
                f"exported (torch.export / torch.compile): an image may keep no query at all, a size of 0 "
                f"that the graph cannot take"
            )

    def _shortcut(self, x, hw, layout: StaticLayout, packing, decision: _Decision, run) -> Optional[torch.Tensor]:
        """Eager shortcuts, decided on the query count (a shape, known without a sync): every
        query one token is the vanilla block; every region skipped is the identity; else None."""
        total = packing.rows.total
        if isinstance(total, torch.Tensor):  # a size some tracers record as a tensor
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                total = int(total)  # specialized: the traced input's count is meant
        if decision.probs is None and total == x.shape[0] * x.shape[1]:
            return self._plain_block(x, hw, layout, run)  # no gather, no scatter
        if total == 0:
            return x
        return None

    def _forward_sparse(self, x, pooled, layout, decision: _Decision, hw, run):
        """Steps 2-4: pack the chosen queries of all images into rows, run the block on them
        (``run``: its ``forward_queries``) against the dense input, unpack ``x + unpool(ŷ - q)``.
        -> (output, queries per image)."""
        b, n, c = x.shape
        e = self.num_extra_tokens
        capturing = is_capturing() and not self.specialized
        if capturing:
            self._check_capture(b, layout)
        packing = pack_queries(layout, decision.choice)
        shortcut = None if capturing else self._shortcut(x, hw, layout, packing, decision, run)
        if shortcut is not None:
            return shortcut, packing.num_queries
        # Packed rows of all images (each image's extra tokens, then its queries).
        queries, centers = gather_queries(packing, query_sources(x, pooled, self.granularities))
        rows = packing.rows if b > 1 else None
        y = run(queries[None], x, hw, centers[None], rows, **self._map_args(layout, packing, b))[0]
        extra_out = y.index_select(0, packing.extra_rows()).view(b, e, c) if e else None
        # The update ŷ - q of each query; in place when no gradient flows (saves a buffer), but not in a
        # graph: y is a view of the block's output there, and a capture writes an in-place update of a
        # view as a copy of the whole output (select_scatter).
        delta = y - queries if torch.is_grad_enabled() or capturing else y.sub_(queries)
        chosen_p = decision.chosen_p
        if chosen_p is not None:
            st = (1.0 + chosen_p - chosen_p.detach()).to(delta.dtype)  # Eq. 6 (router scores are float32)
            st = torch.cat([st, st.new_ones(b, 1)], dim=1).reshape(-1)  # region R: the extra tokens
            delta = delta * st.index_select(0, packing.query_regions())[:, None]
        out = unpack_tokens(x[:, e:], delta, packing)
        return (torch.cat([extra_out, out], dim=1) if e else out), packing.num_queries

    def _forward_dense(self, x, pooled, layout, decision: _Decision, hw, run):
        """All K granularities computed and mixed by the one-hot straight-through gate. Their
        queries go through the block together, in one call: the key/value side is the same
        for every query layout and is computed once (queries attend to the context only)."""
        b, _, c = x.shape
        e = self.num_extra_tokens
        choice, probs = decision.choice, decision.probs
        hard = torch.zeros_like(probs).scatter_(-1, decision.index[..., None], 1.0)
        gate = (hard - probs.detach() + probs).to(x.dtype).view(b, -1, len(self.granularities))
        gate = torch.cat([gate, gate.new_ones(b, 1, gate.shape[-1])], dim=1)  # region R: the extra tokens
        sources = query_sources(x, pooled, self.granularities)
        parts = []  # (k, packing, queries [B, E + M_k, C], centers) per nonzero granularity
        for k, g in enumerate(self.granularities):
            if g > 0:
                # Every image has the same E + M_k rows: the packed rows are a [B, E + M_k] batch.
                packing = pack_queries(layout, torch.full_like(choice, k))
                queries, centers = gather_queries(packing, sources)
                parts.append((k, packing, queries.view(b, -1, c), centers.view(b, -1, 2)))
        y, deltas = self._run_granularities(parts, x, hw, layout, run)
        out = x[:, e:]
        for (k, packing, _, _), delta in zip(parts, deltas):
            weight = gate[..., k].reshape(-1).index_select(0, packing.query_regions()).view(b, -1, 1)
            delta = torch.cat([delta.new_zeros(b, e, c), delta], dim=1) if e else delta  # rows of the extra tokens
            out = unpack_tokens(out, delta * weight, packing)
        return torch.cat([y[:, :e], out], dim=1) if e else out

    def _run_granularities(self, parts, x, hw, layout: StaticLayout, run):
        """(the block's output [B, E + ..., C], each granularity's query updates [B, M_k, C]): in
        one call that sees each image's extra tokens once, then every granularity's queries; or,
        for a block that needs the dense map of its queries, one call per granularity."""
        b, e = x.shape[0], self.num_extra_tokens
        if getattr(self.block, "uses_query_map", False):
            ys = [run(q, x, hw, ct, **self._map_args(layout, packing, b)) for _, packing, q, ct in parts]
            return ys[0], [(y - q)[:, e:] for y, (_, _, q, _) in zip(ys, parts)]
        queries = torch.cat([x[:, :e]] + [q[:, e:] for _, _, q, _ in parts], dim=1)
        centers = torch.cat([parts[0][3].new_zeros(b, e, 2)] + [ct[:, e:] for _, _, _, ct in parts], dim=1)
        y = run(queries, x, hw, centers)
        return y, (y - queries)[:, e:].split([q.shape[1] - e for _, _, q, _ in parts], dim=1)


# FX (timm's feature extraction, ``torch.fx``) treats DGE blocks as leaves: their routing and
# CPU tiling read sizes a symbolic trace does not have.
register_notrace_module(DynamicGrainedEncoder)
