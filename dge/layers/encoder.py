"""The Dynamic Grained Encoder (Sec. 3.2): sparse queries for any vanilla encoder block."""
import contextlib
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .grained import (
    PatchPooler,
    StaticLayout,
    gather_queries,
    pack_queries,
    query_sources,
    static_layout,
    unpack_tokens,
)
from .keys import map_block_keys
from .router import GrainedRouter
from .routing import RoutingInfo, add_routing

__all__ = [
    "DGEOptions",
    "DynamicGrainedEncoder",
    "ROUTING_KINDS",
    "ACCOUNTING_DTYPE",
    "is_capturing",
    "specialize_to_input",
]

ROUTING_KINDS = ("region", "layer")
# Query counts, FLOPs and β are summed in float32 whatever the activations are (a block's
# multiply-adds, ~1e9, overflow float16; bfloat16 keeps 8 bits). float64 would fail on MPS.
ACCOUNTING_DTYPE = torch.float32
_specialized = [False]  # inside specialize_to_input()


def is_capturing() -> bool:
    """Whether the code runs under a graph capture (``torch.jit.trace``, ``torch.export``,
    ``torch.compile``): then nothing may depend on a tensor's value on the host."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


@contextlib.contextmanager
def specialize_to_input() -> Iterator[None]:
    """While active, a trace may take the eager shortcuts that depend on the traced input's
    routing (every query one token: the plain block; every region skipped: the identity), so
    that its graph is the one eager inference runs on that input. For analyses that trace
    each image on its own (fvcore's FLOP count), never for export: such a graph holds only
    for inputs that are routed the same."""
    _specialized[0], previous = True, _specialized[0]
    try:
        yield
    finally:
        _specialized[0] = previous


def _check_granularities(granularities: Sequence[int], region_size: Optional[int]) -> Tuple[int, ...]:
    values = tuple(sorted({int(g) for g in granularities}))
    if not values or any(g < 0 or g != int(g) for g in granularities):
        raise ValueError(f"granularities must be a non-empty set of non-negative integers; got {tuple(granularities)}")
    if max(values) == 0:
        raise ValueError(f"granularities must contain a positive granularity; got {values}")
    if region_size is not None:
        bad = [g for g in values if g > 0 and region_size % g != 0]
        if bad:
            raise ValueError(f"granularities must divide the region size {region_size}; got {bad[0]}")
    return values


@dataclass(frozen=True)
class DGEOptions:
    """How a Dynamic Grained Encoder routes: the one home of these defaults (detectron2's
    MODEL.DGE keys and the classifier's flags take theirs from here).

    Attributes:
        granularities: Φ, e.g. (1, 2, 4); 0 means "skip the region".
        region_size: S; None uses max(Φ). Every φ must divide it.
        routing: "region" (Sec. 3.2.2) or "layer" (the region is the whole map, Table 1).
        gumbel_tau: τ of the soft score (Eq. 5).
        dense_train: in training compute all K granularities and mix them with the one-hot
            straight-through gate (vtpack's default); False computes only the chosen one
            (Eq. 6 exactly, and cheaper).
        init_fine_prob: initial router probability of the finest granularity.
    """

    granularities: Tuple[int, ...] = (1, 2, 4)
    region_size: Optional[int] = None
    routing: str = "region"
    gumbel_tau: float = 1.0
    dense_train: bool = False
    init_fine_prob: float = 0.95

    def __post_init__(self):
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing must be one of {ROUTING_KINDS}; got {self.routing!r}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0; got {self.gumbel_tau}")
        object.__setattr__(self, "granularities", _check_granularities(self.granularities, None))  # sorted
        if self.region_size is not None and self.region_size < 1:
            raise ValueError(f"region_size must be >= 1; got {self.region_size}")
        _check_granularities(self.granularities, self.region_size or max(self.granularities))

    @classmethod
    def coerce(cls, value: Union[None, bool, Mapping[str, Any], "DGEOptions"]) -> Optional["DGEOptions"]:
        """None / False: no DGE; True: the defaults; a mapping of field names or an instance."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        names = tuple(f.name for f in fields(cls))
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown DGE options {unknown}; allowed: {names}")
        return cls(**value)

    @classmethod
    def from_config(cls, dge_cfg) -> "DGEOptions":
        """From detectron2's ``cfg.MODEL.DGE`` (REGION_SIZE 0 means max(Φ))."""
        return cls(
            granularities=tuple(dge_cfg.GRANULARITIES),
            region_size=dge_cfg.REGION_SIZE or None,
            routing=dge_cfg.ROUTING,
            gumbel_tau=dge_cfg.GUMBEL_TAU,
            dense_train=dge_cfg.DENSE_TRAIN,
            init_fine_prob=dge_cfg.INIT_FINE_PROB,
        )

    def replace(self, **changes) -> "DGEOptions":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)


class DynamicGrainedEncoder(nn.Module):
    """Wraps a vanilla encoder block (``dge.layers.block`` protocol) with a router that gives
    each S×S region one granularity φ ∈ Φ; the block runs on one pooled query per φ×φ
    patch against the dense input, and ``x + unpool(block(q, x) - q)`` is returned. It takes
    the vanilla block's call, ``dge(x, hw)``.

    Args:
        block: the vanilla block (``dge.layers.block`` protocol).
        dim: channels C.
        options: a ``DGEOptions`` (Φ, S, routing kind, τ, dense training, router
            initialisation), or just Φ; keyword arguments of its fields override it.
        num_extra_tokens: E leading tokens (e.g. a class token) that are always queries.

    Each forward hands its ``RoutingInfo`` to the open ``dge.layers.record_routing()``
    records of its caller; the module keeps none.
    """

    def __init__(
        self,
        block: nn.Module,
        dim: int,
        options: Union[None, DGEOptions, Sequence[int]] = None,
        num_extra_tokens: int = 0,
        **overrides,
    ):
        super().__init__()
        if options is not None and not isinstance(options, DGEOptions):
            options, overrides = None, dict(overrides, granularities=options)
        options = replace(options or DGEOptions(), **overrides)
        self.options = options
        self.granularities = options.granularities
        self.region_size = options.region_size or max(options.granularities)
        self.routing = options.routing
        self.gumbel_tau = options.gumbel_tau
        self.dense_train = options.dense_train
        self.num_extra_tokens = num_extra_tokens
        self.block = block
        k = len(self.granularities)
        fine = self.granularities.index(min(g for g in self.granularities if g > 0))
        self.router = GrainedRouter(dim, k, fine_index=fine, init_fine_prob=options.init_fine_prob) if k > 1 else None
        self.register_buffer("_phi", torch.tensor(self.granularities), persistent=False)

    def extra_repr(self) -> str:
        return (
            f"granularities={self.granularities}, region_size={self.region_size}, "
            f"routing={self.routing}, gumbel_tau={self.gumbel_tau}, dense_train={self.dense_train}"
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        map_block_keys(state_dict, prefix, wrapped=True)  # a vanilla checkpoint: keys without "block."
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ routing
    def layout(self, hw: Tuple[int, int], device) -> StaticLayout:
        region = self.region_size if self.routing == "region" else None
        with unset_fake_temporarily():  # real tensors, also under torch.export: constants of its graph
            return static_layout(hw[0], hw[1], self.granularities, region, torch.device(device), self.num_extra_tokens)

    def _check_map(self, granularity_map: torch.Tensor, batch: int, layout: StaticLayout) -> torch.Tensor:
        hr, wr = layout.regions_hw
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
        hr, wr = layout.regions_hw
        if self.routing == "layer":
            region_means = spatial.mean(dim=1)
        else:
            region_means = pooled[self.region_size]
        logits = self.router(region_means.reshape(b, hr, wr, c))  # Eq. 1
        return GrainedRouter.select(logits, stochastic=self.training, tau=self.gumbel_tau)

    # ------------------------------------------------------------------ forward
    def forward(
        self, x: torch.Tensor, hw: Tuple[int, int], granularity_map: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """x: [B, E + H*W, C] -> [B, E + H*W, C]; ``granularity_map`` [B, Hr, Wr] (values in Φ)
        bypasses the router."""
        b, n, c = x.shape
        h, w = hw
        e = self.num_extra_tokens
        if n != e + h * w:
            raise ValueError(f"expected E + H*W = {e} + {h}*{w} = {e + h * w} tokens; got {n}")
        layout = self.layout(hw, x.device)
        spatial = x[:, e:]
        use_router = granularity_map is None and self.router is not None
        pooled = PatchPooler(spatial, layout)

        probs = None
        if granularity_map is not None:
            gmap = self._check_map(granularity_map, b, layout)
            index = torch.searchsorted(self._phi, gmap)  # Φ is ascending
        elif self.router is None:
            index = self._phi.new_zeros((b,) + layout.regions_hw)
            gmap = self._phi[index]
        else:
            index, probs = self._route(spatial, pooled, layout)
            gmap = self._phi[index]
        choice = index.view(b, -1)
        # Straight-through factor per region (Eq. 6): 1 forward, gradient p_i backward.
        chosen_p = None if probs is None else probs.gather(-1, index[..., None]).view(b, -1)

        if chosen_p is not None:  # routed in training
            # ψ of Eq. 7: valid patches of the chosen granularity per region.
            per_region = torch.take_along_dim(layout.region_num_patches[None], choice[:, None], 1)[:, 0]
        if self.training and self.dense_train and probs is not None:
            out = self._forward_dense(x, pooled, layout, choice, probs, hw)
            num_queries = per_region.sum(dim=1).long()
        else:
            out, num_queries = self._forward_sparse(x, pooled, layout, choice, chosen_p, hw)
        query_count = num_queries.to(ACCOUNTING_DTYPE)  # not the activation dtype: fp16 overflows a block's FLOPs
        if chosen_p is not None:
            soft = (chosen_p * per_region).sum(dim=1)
            query_count = query_count + soft - soft.detach()  # Eq. 7, straight-through
        add_routing(self, RoutingInfo(
            granularity_map=gmap,
            num_queries=num_queries,
            query_count=query_count,
            hw=(h, w),
            num_extra=e,
            router_flops=self.router.flops(layout.num_regions) if use_router else 0.0,
            block_cost=self.block.complexity(hw, e),
        ))
        return out

    def _plain_block(self, x: torch.Tensor, hw: Tuple[int, int], layout: StaticLayout) -> torch.Tensor:
        """The vanilla block on every token (what all-φ=1 routing computes)."""
        b, e = x.shape[0], self.num_extra_tokens
        centers = layout.token_centers.expand(b, -1, -1)  # float32 in any dtype (positions)
        if e:
            centers = torch.cat([centers.new_zeros(b, e, 2), centers], dim=1)
        return self.block.forward_queries(x, x, hw, centers)

    def _forward_sparse(self, x, pooled, layout, choice, chosen_p, hw):
        b, n, c = x.shape
        e = self.num_extra_tokens
        if is_capturing() and not _specialized[0]:
            if b > 1:
                raise RuntimeError(
                    f"a DGE block is traced or exported at batch 1 only (attention pads a batch by the "
                    f"image with most queries, a size read from the device); got batch {b}"
                )
            if layout.skip_choice is not None and e == 0 and torch.compiler.is_compiling():
                raise RuntimeError(
                    f"a DGE block with 0 in its granularities {self.granularities} and no extra token is not "
                    f"exported (torch.export / torch.compile): an image may keep no query at all, a size of 0 "
                    f"that the graph cannot take"
                )
        packing = pack_queries(layout, choice)
        if _specialized[0] or not is_capturing():
            # Eager shortcuts, decided on the query count (a shape, known without a sync).
            total = packing.rows.total
            if isinstance(total, torch.Tensor):  # a size some tracers record as a tensor
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)
                    total = int(total)  # specialized: the traced input's count is meant
            if chosen_p is None and total == b * n:
                # Every query is one token: exactly the vanilla block (no gather, no scatter).
                return self._plain_block(x, hw, layout), packing.num_queries
            if total == 0:  # every region skipped
                return x, packing.num_queries
        # Packed rows of all images (each image's extra tokens, then its queries).
        queries, centers = gather_queries(packing, query_sources(x, pooled, self.granularities))
        y = self.block.forward_queries(queries[None], x, hw, centers[None], packing.rows if b > 1 else None)[0]
        extra_out = y.index_select(0, packing.extra_rows()).view(b, e, c) if e else None
        # The update ŷ - q of each query; in place when no gradient flows (saves a buffer).
        delta = y - queries if torch.is_grad_enabled() else y.sub_(queries)
        if chosen_p is not None:
            st = (1.0 + chosen_p - chosen_p.detach()).to(delta.dtype)  # Eq. 6 (router scores are float32)
            st = torch.cat([st, st.new_ones(b, 1)], dim=1).reshape(-1)  # region R: the extra tokens
            delta = delta * st.index_select(0, packing.query_regions())[:, None]
        out = unpack_tokens(x[:, e:], delta, packing)
        return (torch.cat([extra_out, out], dim=1) if e else out), packing.num_queries

    def _forward_dense(self, x, pooled, layout, choice, probs, hw):
        """All K granularities computed and mixed by the one-hot straight-through gate. Their
        queries go through the block together, in one call: the key/value side is the same
        for every query layout and is computed once (queries attend to the context only)."""
        b, _, c = x.shape
        e = self.num_extra_tokens
        index = choice.view(probs.shape[:-1])
        hard = torch.zeros_like(probs).scatter_(-1, index[..., None], 1.0)
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
        # The block sees each image's extra tokens once, then every granularity's queries.
        queries = torch.cat([x[:, :e]] + [q[:, e:] for _, _, q, _ in parts], dim=1)
        centers = torch.cat([parts[0][3].new_zeros(b, e, 2)] + [ct[:, e:] for _, _, _, ct in parts], dim=1)
        y = self.block.forward_queries(queries, x, hw, centers)
        deltas = (y - queries)[:, e:].split([q.shape[1] - e for _, _, q, _ in parts], dim=1)
        out = x[:, e:]
        for (k, packing, _, _), delta in zip(parts, deltas):
            weight = gate[..., k].reshape(-1).index_select(0, packing.query_regions()).view(b, -1, 1)
            delta = torch.cat([delta.new_zeros(b, e, c), delta], dim=1) if e else delta  # rows of the extra tokens
            out = unpack_tokens(out, delta * weight, packing)
        return torch.cat([y[:, :e], out], dim=1) if e else out
