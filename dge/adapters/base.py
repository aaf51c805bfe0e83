"""What every adapter shares: the registry that finds one for a block, the stages ``patch``
walks, and the base of the timm adapters.

An adapter puts a vanilla block of some family into the block protocol
(``dge.layers.protocol.DGEBlock``) without copying a tensor: it holds the block's own
modules under their own names. It is registered for the block class it adapts
(``register_adapter``) and found by the block's type (``find_adapter``), so a new family is
one file with one registered class and no edit anywhere else.
"""
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, List, Optional, Tuple, Type

import torch
from torch import nn
from torch.nn import functional as F

from dge.layers import BlockCall, BlockCost, DGEOptions
from dge.layers.block import drop_path_rows
from dge.layers.rows import row_images
from dge.layers.windows import WindowRows, window_rows

__all__ = [
    "ADAPTERS",
    "Adapter",
    "Stage",
    "TimmAdapter",
    "TokenGrid",
    "check_tiles",
    "find_adapter",
    "global_attention_cost",
    "head_norm",
    "windowed_attention_cost",
    "linear_cost",
    "norm_cost",
    "place_queries",
    "project_qkv",
    "refuse_mask",
    "register_adapter",
    "split_heads",
]


class TokenGrid:
    """The token map size (H, W) of a stage's latest forward, for blocks whose model calls them
    without it (timm's ``blk(x)``): written by the stage's patch embedding, read by its
    blocks. ``checks`` run once per forward on the recorded size (e.g. EVA's rotary step)."""

    def __init__(self):
        self.hw: Optional[Tuple[int, int]] = None
        self.checks: Dict[str, Callable[[Tuple[int, int]], None]] = {}

    def record(self, hw: Tuple[int, int]) -> None:
        for check in self.checks.values():
            check(hw)
        self.hw = hw

    def read(self) -> Tuple[int, int]:
        if self.hw is None:
            raise RuntimeError("a patched block ran before its model's patch embedding recorded the token grid")
        return self.hw


@dataclass
class Stage:
    """One stage of a model as ``patch`` walks it: its block list (whose items are wrapped in
    place), the token grid its blocks share, its extra tokens, and the module that records
    the grid on each forward (None when the blocks are called with their map size).
    ``wrapped``: (index, adapter class) of each block ``patch`` wrapped."""

    blocks: nn.Module
    num_extra: int = 0
    recorder: Optional[nn.Module] = None
    model: Optional[nn.Module] = None
    grid: TokenGrid = field(default_factory=TokenGrid)
    wrapped: List[Tuple[int, type]] = field(default_factory=list)


class Adapter:
    """A registry entry: how ``patch`` wraps one family's blocks.

    ``block_type`` keys the registry. ``supports`` says whether a block of that type (or a
    subclass) is one this adapter re-composes exactly; ``check`` refuses settings it cannot
    take (a ValueError naming the fix) before any block is touched; ``wrap`` gives the
    ``DGEBlock`` (with a ``dim``), ``unwrap`` the original block back."""

    block_type: ClassVar[type]
    family: ClassVar[str]  # what the error lists, e.g. "timm Block + Attention (ViT, DeiT III, ...)"

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        return isinstance(block, cls.block_type)

    @classmethod
    def window(cls, block: nn.Module) -> Optional[Tuple[int, int]]:
        """The block's attention window (Wh, Ww) in tokens, or None (global attention)."""
        return None

    @classmethod
    def dense(cls, block: nn.Module) -> bool:
        """Whether ``patch`` leaves this block as it is, outside DGE (e.g. a block that pools its
        queries between stages); its cost then stays outside β, as a patch embedding's does."""
        return False

    @classmethod
    def check(cls, block: nn.Module, label: str, stage: Stage, options: DGEOptions) -> None:
        """Refuses what the adapter cannot take: by default, regions that do not tile the
        block's ``window`` (``check_tiles``; nothing for global attention)."""
        check_tiles(cls.window(block), label, options)

    @classmethod
    def wrap(cls, block: nn.Module, stage: Stage) -> nn.Module:
        return cls(block, stage)

    @staticmethod
    def unwrap(adapted: nn.Module) -> nn.Module:
        return adapted.original


ADAPTERS: Dict[type, Type[Adapter]] = {}  # block class -> its adapter


def register_adapter(adapter: Type[Adapter]) -> Type[Adapter]:
    """Class decorator: ``adapter`` wraps blocks of ``adapter.block_type`` (and subclasses
    that ``adapter.supports``)."""
    ADAPTERS[adapter.block_type] = adapter
    return adapter


def find_adapter(block: nn.Module, label: str) -> Type[Adapter]:
    """The registered adapter of ``block``'s type (or its nearest registered base class), or a
    TypeError that names the block and every supported family."""
    for base in type(block).__mro__:
        adapter = ADAPTERS.get(base)
        if adapter is not None and adapter.supports(block):
            return adapter
    families = "; ".join(sorted(a.family for a in ADAPTERS.values()))
    attn = getattr(block, "attn", None)
    has = f" with {type(attn).__name__}" if attn is not None else ""
    raise TypeError(f"dge.patch supports {families}. {label} is {type(block).__name__}{has}")


# ---------------------------------------------------------------------------- timm blocks
class TimmAdapter(Adapter, nn.Module):
    """Base of the timm adapters: the block's modules and parameters under their own names
    (the same tensors; ``original`` is the block itself), its vanilla call as ``forward``,
    and the pre-norm composition of ``forward_queries``: ``x + ls1(attn(norm1(q),
    norm1(context)))``, then ``x + ls2(mlp(norm2(x)))``, with stochastic depth per image.
    A family supplies ``attention_type`` and ``_attention``; ``supports`` asks that the block
    and its attention keep timm's forward (a subclass that changes it is another family)."""

    attention_type: ClassVar[type]

    def __init__(self, block: nn.Module, stage: Optional[Stage] = None):
        """``stage``: where ``patch`` found the block (None: a block on its own, which is then
        called with its map size or takes maps)."""
        nn.Module.__init__(self)
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block._parameters.items():  # e.g. EVA's layer scales (None where unset)
            self.register_parameter(name, param)
        self._original = (block,)  # a tuple: not a submodule, no second set of keys
        self.grid = stage.grid if stage is not None else TokenGrid()
        self.dim = block.norm1.normalized_shape[0]

    @classmethod
    def supports(cls, block: nn.Module) -> bool:
        attn = getattr(block, "attn", None)
        return type(block).forward is cls.block_type.forward and type(attn).forward is cls.attention_type.forward

    @property
    def original(self) -> nn.Module:
        """The timm block this adapter was made from (it shares every module)."""
        return self._original[0]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The original block's own call."""
        return self.original(*args, **kwargs)

    def prepare(self, x: torch.Tensor, hw=None, attn_mask=None, is_causal: bool = False) -> BlockCall:
        """timm's ``blk(x, attn_mask=None, is_causal=False)``: x [B, E + H*W, C], the map size
        from the stage's grid."""
        refuse_mask(attn_mask, is_causal)
        return BlockCall(x, tuple(hw) if hw is not None else self.grid.read(), self.forward_queries)

    def forward_queries(self, queries, context, hw, query_centers=None, rows=None, **kwargs) -> torch.Tensor:
        """``kwargs``: the family's own arguments of this call (EVA's rotary table), for ``_attention``."""
        q = self.norm1(queries)
        ctx = q if context is queries else self.norm1(context)
        attn = self.layer_scale(1, self._attention(q, ctx, hw, query_centers, rows, **kwargs))
        x = queries + drop_path_rows(self.drop_path1, attn, rows)
        return x + drop_path_rows(self.drop_path2, self.layer_scale(2, self.mlp(self.norm2(x))), rows)

    def _attention(self, queries, context, hw, centers, rows) -> torch.Tensor:
        raise NotImplementedError

    def layer_scale(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """timm's ``ls{i}`` module (``nn.Identity`` when unset; none in Swin's blocks)."""
        scale = getattr(self, f"ls{i}", None)
        return x if scale is None else scale(x)


def check_tiles(window: Optional[Tuple[int, int]], label: str, options: DGEOptions) -> None:
    """A ValueError unless the region size divides the block's window (regions must tile windows),
    naming the granularities that do and ``fit_to_windows``."""
    region = options.region_size or max(options.granularities)
    if window is None or (window[0] % region == 0 and window[1] % region == 0):
        return
    size = math.gcd(*window)
    fits = tuple(g for g in range(1, size + 1) if size % g == 0)
    raise ValueError(
        f"dge.patch: region size {region} does not divide {label}'s window {window[0]}x{window[1]}; regions must "
        f"tile windows: take granularities from {fits} (the largest is the region size), e.g. {(1, fits[-1])}, or "
        f"let each block take what fits its window: dge.patch(model, dge.adapters.fit_to_windows(options))"
    )


def refuse_mask(attn_mask, is_causal: bool) -> None:
    """A DGE block attends without a mask (timm passes one only when asked, e.g. in an FX trace)."""
    if attn_mask is not None or is_causal:
        raise ValueError("a DGE block attends without a mask: attn_mask must be None and is_causal False")


def place_queries(queries: torch.Tensor, centers: torch.Tensor, rows, batch: int, hw, window) -> WindowRows:
    """Where ``queries`` [B', M, C] (packed rows with ``rows``, or a [B, M] batch) sit in the
    Wh×Ww windows of the padded ``hw`` map of ``batch`` images (``dge.layers.windows``)."""
    images = rows.image_index if rows is not None else row_images(batch, queries.shape[1], queries.device)
    return window_rows(centers.reshape(-1, 2), images, batch, hw, window)


def head_norm(norm: nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """timm's per-head q / k norm on [..., heads·d] rows (nothing for ``nn.Identity``)."""
    if isinstance(norm, nn.Identity):
        return x
    return norm(x.view(*x.shape[:-1], heads, -1)).view(x.shape)


def split_heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[N, M, heads * d] projections -> [N, heads, M, d] each, timm's q / k norms applied."""
    q, k, v = (t.view(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    return attn.q_norm(q), attn.k_norm(k), v


def project_qkv(attn: nn.Module, queries: torch.Tensor, context: torch.Tensor):
    """(q, k, v) [B, *, heads * d]: q from the queries, k and v from the context, with the
    rows of a fused ``qkv`` (its bias, or EVA's q / k / v biases) or separate ``q_proj`` /
    ``k_proj`` / ``v_proj``."""
    if getattr(attn, "qkv", None) is None:
        return attn.q_proj(queries), attn.k_proj(context), attn.v_proj(context)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    a = weight.shape[0] // 3
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    q = F.linear(queries, weight[:a], None if bias is None else bias[:a])
    kv = F.linear(context, weight[a:], None if bias is None else bias[a:])
    return q, kv[..., :a], kv[..., a:]


def norm_cost(norm: Optional[nn.Module], width: int) -> float:
    """Multiply-adds per token of a norm, fvcore's convention (LayerNorm / GroupNorm: 5 per element)."""
    return 5.0 * width if isinstance(norm, (nn.LayerNorm, nn.GroupNorm)) else 0.0


def linear_cost(module: nn.Module) -> float:
    """Multiply-adds per token of every Linear (and LayerNorm) in ``module``."""
    linear = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    norms = sum(norm_cost(m, m.normalized_shape[0]) for m in module.modules() if isinstance(m, nn.LayerNorm))
    return float(linear + norms)


def _attention_parts(block: nn.Module) -> Tuple[int, int, float, float, float]:
    """(C, A, q-norm, k-norm, output norm + projection) per token of a block's attention."""
    attn = block.attn
    c, a = block.dim, attn.proj.in_features
    outputs = norm_cost(getattr(attn, "norm", None), a) + linear_cost(attn.proj)
    return c, a, norm_cost(getattr(attn, "q_norm", None), a), norm_cost(getattr(attn, "k_norm", None), a), outputs


def global_attention_cost(block: TimmAdapter, hw: Tuple[int, int], num_extra: int) -> BlockCost:
    """A pre-norm block with global attention (timm's ``Attention``, EVA's, Hiera's): fixed is
    ``norm1`` of the context, the k and v projections and the k norm; per query everything
    else (softmax, GELU, rotations, layer scales: 0). The vanilla block norms each token once,
    where the DGE form norms queries and context apart (``vanilla_delta``)."""
    n = math.prod(hw) + num_extra
    c, a, q_norm, k_norm, outputs = _attention_parts(block)
    norm1 = norm_cost(block.norm1, c)
    fixed = n * (norm1 + 2 * c * a + k_norm)
    per_query = norm1 + c * a + q_norm + 2.0 * n * a + outputs
    return BlockCost(fixed, per_query + norm_cost(block.norm2, c) + linear_cost(block.mlp), -n * norm1)


def windowed_attention_cost(block: TimmAdapter, hw: Tuple[int, int], window: Tuple[int, int],
                            rel: Tuple[float, float] = (0.0, 0.0), pre_norm: bool = True) -> BlockCost:
    """A block attending in Wh×Ww windows of its zero-padded map (SAM, Swin, Hiera). Both
    forms project keys and values and attend over every slot of the padded windows (fixed);
    the vanilla block also projects its padding tokens' queries and outputs, which the DGE
    form skips (``vanilla_delta``). ``rel``: relative-position multiply-adds per slot of the
    (vanilla, DGE) form. ``pre_norm``: ``norm1`` before attention (its context norm fixed;
    the vanilla block norms each token once), else after it (Swin v2: per query only)."""
    n, slots = math.prod(hw), window[0] * window[1]
    padded = math.prod(-(-s // w) * w for s, w in zip(hw, window))
    c, a, q_norm, k_norm, outputs = _attention_parts(block)
    norm1 = norm_cost(block.norm1, c)
    fixed = padded * (2 * c * a + q_norm + k_norm + 2.0 * slots * a + rel[1]) + (n * norm1 if pre_norm else 0.0)
    per_query = norm1 + c * a + outputs + norm_cost(block.norm2, c) + linear_cost(block.mlp)
    delta = (padded - n) * (c * a + outputs) + padded * (rel[0] - rel[1]) - (n * norm1 if pre_norm else 0.0)
    return BlockCost(fixed, per_query, delta)
