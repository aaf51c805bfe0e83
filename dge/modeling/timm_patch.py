"""DGE as a plugin for timm's vision transformers, in place.

``patch(model, options)`` wraps every block of a timm ``VisionTransformer`` (ViT, DeiT III,
MAE, DINOv2 with registers and layer scale: timm's ``Block`` with its fused-qkv
``Attention``) or ``Eva`` (EVA, EVA-02: ``EvaBlock`` with rotary position embeddings) in the
one ``DynamicGrainedEncoder``; ``unpatch(model)`` puts the original blocks back.
``TimmBlock`` supplies the block protocol (``dge.layers.block``) over the timm block's own
modules: queries take the q projection, the dense context the k and v projections, then
timm's q/k norms, attention, projection, layer scales and MLP. EVA's rotary table rotates
the keys as timm does and each pooled query at its region's centre (``rope_at_centers``).
SAM's blocks (``VisionTransformerSAM``, ViTDet's design: W×W windows of the zero-padded map,
global blocks between, decomposed relative positions; they take maps [B, H, W, C]) attend
each pooled query to its window's keys (``dge.layers.windows``); the region size must
divide the window size, so that regions tile windows.

Keys: a patched block keeps the timm block's modules under ``block.`` and adds ``router.``;
the unpatched model's state dict loads into the patched one (``map_block_keys``), the
routers being the only missing keys. Prefix tokens (class token, registers) are the DGE
block's extra tokens, always queries.

The patch grid: timm calls a block as ``blk(x)``, without the map size. The patch
embedding records it: ``patch`` sets a subclass of its class on the instance (same
parameters and keys; an FX leaf, so a traced model records it too) that writes
``(H, W)`` to a ``TokenGrid`` its blocks read.
"""
import functools
import logging
import math
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from timm.layers import Attention, RotaryEmbeddingCat, apply_rot_embed_cat
from timm.models import register_notrace_module
from timm.models import vision_transformer_sam as sam
from timm.models.eva import EvaAttention, EvaBlock
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from dge.layers import DGEOptions, DynamicGrainedEncoder
from dge.layers.attention import attend, sdpa
from dge.layers.block import drop_path_rows
from dge.layers.grained import QueryRows, row_images
from dge.layers.windows import rel_pos_bias, window_rows

__all__ = ["patch", "unpatch", "is_patched", "TimmBlock", "TokenGrid"]

logger = logging.getLogger(__name__)


class TokenGrid:
    """The patch grid (H, W) of a patched model's latest forward: written by its patch
    embedding, read by its blocks; and, for a model with rotary embeddings, what bounds
    their angle step per token (host numbers, read once when patching)."""

    def __init__(self, rope: Optional[nn.Module] = None):
        self.hw: Optional[Tuple[int, int]] = None
        self.rope_band = 0.0 if rope is None else float(rope.bands.abs().max())
        self.rope_ref = None if rope is None else rope.ref_feat_shape

    def record(self, hw: Tuple[int, int]) -> None:
        """The grid of this forward (the patch embedding's call), checked against the rotary
        table once here rather than in every block."""
        if self.rope_band:
            self.check_rope_step(hw)
        self.hw = hw

    def check_rope_step(self, hw: Tuple[int, int]) -> None:
        """Pooled queries take the rotary angle between tokens, read off the table: exact
        while a channel turns by less than π per token (EVA rescales the grid to its
        pre-training size ``ref_feat_shape``, which turns faster on small grids)."""
        ref = self.rope_ref or hw  # without a pre-training grid the step is the band itself
        scale = max(r / s for r, s in zip(ref, hw))
        if self.rope_band * scale >= math.pi:
            least = math.ceil(self.rope_band * max(ref) / math.pi + 1e-9)
            raise ValueError(
                f"a {hw[0]}x{hw[1]} patch grid turns the rotary embedding by {self.rope_band * scale:.2f} rad a "
                f"token (≥ π) at its pre-training grid {tuple(ref)}: DGE's pooled queries need at least "
                f"{least} patches a side"
            )


@functools.lru_cache(maxsize=None)
def _grid_recording(cls: type) -> type:
    """A subclass of the patch embedding ``cls`` whose forward also records the grid."""

    def forward(self, x, *args, **kwargs):
        self.dge_grid.record(tuple(self.dynamic_feat_size((x.shape[-2], x.shape[-1]))))
        return cls.forward(self, x, *args, **kwargs)

    recording = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "dge_base": cls})
    register_notrace_module(recording)  # an FX leaf: a traced model runs the recording too
    return recording


def _check_block(block: nn.Module, index: int) -> None:
    """timm's Block with Attention, or EVA's EvaBlock with EvaAttention (or subclasses that
    keep their forward): the computations ``TimmBlock`` re-composes from their parts."""
    attn = getattr(block, "attn", None)
    pairs = ((Block, Attention), (EvaBlock, EvaAttention), (sam.Block, sam.Attention))
    if not any(type(block).forward is b.forward and type(attn).forward is a.forward for b, a in pairs):
        raise TypeError(
            f"dge.patch supports timm's Block with its fused-qkv Attention (ViT, DeiT III, MAE, DINOv2) "
            f"EvaBlock with EvaAttention (EVA, EVA-02) and SAM's windowed Block; block {index} is "
            f"{type(block).__name__} with {type(attn).__name__}"
        )
    if getattr(attn, "gate", None) is not None or getattr(attn, "rope", None) is not None:
        raise TypeError(f"dge.patch: block {index} has a gated or rotary SAM attention, which it does not support")


class TimmBlock(nn.Module):
    """A timm ``Block`` or ``EvaBlock`` in the block protocol: its modules and parameters
    (same names, same tensors) and ``forward_queries``; ``forward(x, hw)`` is the original
    block. ``grid`` gives the map size the model's caller does not pass."""

    def __init__(self, block: nn.Module, grid: TokenGrid):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        for name, param in block._parameters.items():  # EVA's layer scales (None where unset)
            self.register_parameter(name, param)
        self._original = (block,)  # a tuple: not a submodule, no second set of keys
        self._grid = grid
        self.dim = block.norm1.normalized_shape[0]

    @property
    def original(self) -> nn.Module:
        """The timm block this adapter was made from (it shares every module)."""
        return self._original[0]

    def token_grid(self) -> Tuple[int, int]:
        if self._grid.hw is None:
            raise RuntimeError("a patched timm block ran before its model's patch embedding recorded the grid")
        return self._grid.hw

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None, rope=None) -> torch.Tensor:
        if isinstance(self.attn, sam.Attention):  # SAM's blocks take [B, H, W, C]
            hw = hw or self.token_grid()
            return self.original(x.view(x.shape[0], hw[0], hw[1], -1)).flatten(1, 2)
        return self.original(x) if rope is None else self.original(x, rope=rope)

    def forward_queries(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
        rope: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        q = self.norm1(queries)
        ctx = q if context is queries else self.norm1(context)
        if rope is not None:  # (the grid checked its step against the table when recorded)
            rope = (rope, rope_at_centers(rope, hw, query_centers))
        if isinstance(self.attn, sam.Attention):
            attn = self._windowed_attention(q, ctx, hw, query_centers, rows)
        else:
            attn = self._attention(q, ctx, rows, rope)
        attn = self._layer_scale(1, attn)
        x = queries + drop_path_rows(self.drop_path1, attn, rows)
        return x + drop_path_rows(self.drop_path2, self._layer_scale(2, self.mlp(self.norm2(x))), rows)

    def _layer_scale(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """timm's ``ls{i}`` module, or EVA's ``gamma_{i}`` parameter (None: no scale)."""
        ls = getattr(self, f"ls{i}", None)
        if ls is not None:
            return ls(x)
        gamma = getattr(self, f"gamma_{i}", None)
        return x if gamma is None else gamma * x

    def _attention(self, queries, context, rows: Optional[QueryRows], rope) -> torch.Tensor:
        """timm's attention with queries apart from the context: q projected from the
        queries, k and v from the context; ``rope``: (the context's rotary table, the
        queries' table at their centres) or None."""
        attn = self.attn
        q, k, v = _heads(attn, *_project(attn, queries, context))
        if rope is not None:
            half, e = attn.rotate_half, attn.num_prefix_tokens  # as EvaAttention: prefix keys unrotated
            k = torch.cat([k[:, :, :e], apply_rot_embed_cat(k[:, :, e:], rope[0], half=half)], dim=2).type_as(v)
            q = apply_rot_embed_cat(q, rope[1][:, None], half=half).type_as(v)
        x = attend(q, k, v, rows, attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(attn.norm(x)))

    def _windowed_attention(self, queries, context, hw, centers, rows: Optional[QueryRows]) -> torch.Tensor:
        """SAM's attention (ViTDet's): in W×W windows of the zero-padded map, or global
        (``window_size`` 0), with the decomposed relative-position bias at each query's
        centre (``dge.layers.windows``)."""
        attn, window = self.attn, self.original.window_size
        heads, d = attn.num_heads, attn.head_dim
        b, c = context.shape[0], context.shape[-1]
        if window > 0:  # the vanilla block's padded windows: [B·nW, W², C]
            context = sam.window_partition(context.view(b, hw[0], hw[1], c), window)[0].flatten(1, 2)
        q, k, v = _project(attn, queries, context)
        key_hw = (window, window) if window > 0 else hw
        if window > 0:
            images = rows.image_index if rows is not None else row_images(b, queries.shape[1], q.device)
            place = window_rows(centers.reshape(-1, 2), images, b, hw, window)
            q, centers = place.scatter(q.reshape(-1, q.shape[-1])), place.centers
        elif rows is not None:
            q, centers = rows.pad(q[0]), rows.pad(centers[0])
        q, k, v = _heads(attn, q, k, v)
        bias = rel_pos_bias(q, centers, (attn.rel_pos_h, attn.rel_pos_w), key_hw) if attn.use_rel_pos else None
        x = sdpa(q, k, v, attn.attn_drop.p if self.training else 0.0, bias)
        # a copy in the contiguous layout: ONNX's decomposition of biased SDPA strides its output
        # otherwise than export recorded, and a reshape recorded as a view then fails
        x = x.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(x.shape[0], x.shape[2], heads * d)
        if window > 0:
            x = place.gather(x)
        elif rows is not None:
            x = rows.unpad(x)
        return attn.proj_drop(attn.proj(x.reshape(queries.shape[0], queries.shape[1], -1)))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        """(fixed, per_query) multiply-adds, fvcore's convention (LayerNorm 5 per element;
        softmax, GELU, rotations, layer scales, additions 0). Fixed: ``norm1`` of the context,
        the k and v projections and the k norm; per query: everything else."""
        if isinstance(self.attn, sam.Attention):
            return self._windowed_complexity(hw)
        n = hw[0] * hw[1] + num_extra
        c, a = self.dim, self.attn.num_heads * self.attn.head_dim
        fixed = n * (_norm_cost(self.norm1, c) + 2 * c * a + _norm_cost(self.attn.k_norm, a))
        per_query = _norm_cost(self.norm1, c) + c * a + _norm_cost(self.attn.q_norm, a) + 2.0 * n * a
        per_query += _norm_cost(self.attn.norm, a) + _linear_cost(self.attn.proj)
        return fixed, per_query + _norm_cost(self.norm2, c) + _linear_cost(self.mlp)

    def _windowed_complexity(self, hw: Tuple[int, int]) -> Tuple[float, float]:
        """SAM's block: the vanilla one attends from and to the zero-padded map in windows
        (whose attention, one dense call per window here too, is fixed) or globally (per
        query); fixed also holds the vanilla block's work on padding tokens."""
        window, attn = self.original.window_size, self.attn
        n, c, a = hw[0] * hw[1], self.dim, attn.num_heads * attn.head_dim
        keys = (window, window) if window > 0 else hw
        padded = math.prod(-(-s // window) * window for s in hw) if window > 0 else n
        core = 2.0 * keys[0] * keys[1] * a + (sum(keys) * a if attn.use_rel_pos else 0.0)
        rowwise = c * a + _norm_cost(attn.q_norm, a) + _linear_cost(attn.proj)  # q projection and norm, proj
        fixed = n * _norm_cost(self.norm1, c) + padded * (2 * c * a + _norm_cost(attn.k_norm, a))
        fixed += (padded - n) * rowwise + (padded * core if window > 0 else 0.0)
        per_query = _norm_cost(self.norm1, c) + rowwise + _norm_cost(self.norm2, c) + _linear_cost(self.mlp)
        return fixed, per_query + (core if window == 0 else 0.0)


def _heads(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """[N, M, heads * d] projections -> [N, heads, M, d] each, timm's q / k norms applied."""
    q, k, v = (t.view(t.shape[0], t.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    return attn.q_norm(q), attn.k_norm(k), v


def _project(attn: nn.Module, queries: torch.Tensor, context: torch.Tensor):
    """(q, k, v) [B, *, heads * d]: q from the queries, k and v from the context, with the
    rows of a fused ``qkv`` (timm's bias, or EVA's q / k / v biases) or EVA's separate
    ``q_proj`` / ``k_proj`` / ``v_proj``."""
    if getattr(attn, "qkv", None) is None:
        return attn.q_proj(queries), attn.k_proj(context), attn.v_proj(context)
    a, weight, bias = attn.num_heads * attn.head_dim, attn.qkv.weight, attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    q = F.linear(queries, weight[:a], None if bias is None else bias[:a])
    kv = F.linear(context, weight[a:], None if bias is None else bias[a:])
    return q, kv[..., :a], kv[..., a:]


def rope_at_centers(table: torch.Tensor, hw: Tuple[int, int], centers: torch.Tensor) -> torch.Tensor:
    """timm's concatenated rotary table [H*W, 2D] (sin | cos) evaluated at query centres
    [B, M, 2] (y, x; token (i, j) centred at (i + 0.5, j + 0.5); extra tokens at 0, which
    get the identity rotation) -> [B, M, 2D] float32.

    Each channel's angle is affine in the token index (timm's index, pixel and centred grids,
    EVA's rescaling), so the angle at a centre is the table's at the token below it plus the
    fraction times the channel's one-token step, read off the table (|step| < π: true of
    index-grid bands, whose step is at most the grid's rescale factor). Whole-token centres
    read the table exactly."""
    if table.dim() != 2 or table.shape[0] != hw[0] * hw[1]:
        raise ValueError(
            f"dge needs a rotary table [H*W = {hw[0] * hw[1]}, 2D] (timm's 'cat' rope); got {tuple(table.shape)}"
        )
    sin, cos = table.float().view(hw[0], hw[1], -1).chunk(2, dim=-1)
    pos = centers - 0.5
    below = pos.floor().clamp(min=0)
    frac = pos - below
    index = below[..., 0].clamp(max=hw[0] - 1).long() * hw[1] + below[..., 1].clamp(max=hw[1] - 1).long()
    s, c = (t.reshape(hw[0] * hw[1], -1)[index] for t in (sin, cos))
    phi = frac[..., :1] * _step_angle(sin, cos, 0) + frac[..., 1:] * _step_angle(sin, cos, 1)
    sp, cp = phi.sin(), phi.cos()
    s, c = s * cp + c * sp, c * cp - s * sp
    prefix = centers[..., :1] < 0.5
    return torch.cat([s.masked_fill(prefix, 0.0), c.masked_fill(prefix, 1.0)], dim=-1)


def _step_angle(sin: torch.Tensor, cos: torch.Tensor, dim: int) -> torch.Tensor:
    """[D] each channel's angle step from token 0 to token 1 along ``dim`` of [H, W, D]
    tables, in (-π, π] (0 for a grid one token wide)."""
    if sin.shape[dim] < 2:
        return sin.new_zeros(sin.shape[-1])
    s0, s1 = sin.select(dim, 0)[0], sin.select(dim, 1)[0]
    c0, c1 = cos.select(dim, 0)[0], cos.select(dim, 1)[0]
    return torch.atan2(s1 * c0 - c1 * s0, c1 * c0 + s1 * s0)


def _norm_cost(norm: Optional[nn.Module], width: int) -> float:
    return 5.0 * width if isinstance(norm, (nn.LayerNorm, nn.GroupNorm)) else 0.0


def _linear_cost(module: nn.Module) -> float:
    """Multiply-adds per token of every Linear (and norm) in ``module``."""
    linear = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    norms = sum(_norm_cost(m, m.normalized_shape[0]) for m in module.modules() if isinstance(m, nn.LayerNorm))
    return float(linear + norms)


def is_patched(model: nn.Module) -> bool:
    return hasattr(getattr(model, "patch_embed", None), "dge_grid")


def patch(model: nn.Module, options: Union[None, Mapping[str, Any], DGEOptions] = None) -> nn.Module:
    """Wraps, in place, every block of the timm vision transformer ``model`` in a
    ``DynamicGrainedEncoder`` (``options``: a ``DGEOptions``, a mapping of its fields or None
    for the defaults) and returns ``model``. The routers are the only new tensors (logged)."""
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched; dge.unpatch(model) first")
    blocks, embed = getattr(model, "blocks", None), getattr(model, "patch_embed", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not hasattr(embed, "dynamic_feat_size"):
        raise TypeError(f"dge.patch takes a timm VisionTransformer (blocks, patch_embed); got {type(model).__name__}")
    for i, block in enumerate(blocks):
        _check_block(block, i)
    rope = getattr(model, "rope", None)
    if rope is not None and (type(rope) is not RotaryEmbeddingCat or rope.grid_type != "index"):
        raise TypeError(f"dge.patch supports EVA's rotary embedding on an index grid; {type(model).__name__} has "
                        f"{type(rope).__name__} (grid {getattr(rope, 'grid_type', None)})")
    options = DGEOptions.coerce(options) or DGEOptions()
    grid = TokenGrid(rope)
    for i, block in enumerate(blocks):
        adapter, weight = TimmBlock(block, grid), block.norm1.weight
        wrapped = DynamicGrainedEncoder(adapter, adapter.dim, options, getattr(model, "num_prefix_tokens", 0))
        window = getattr(block, "window_size", 0)
        if window % wrapped.region_size:
            raise ValueError(
                f"dge.patch: region size {wrapped.region_size} does not divide block {i}'s window size {window}; "
                f"regions must tile windows (e.g. granularities (1, 2) for windows of 14)"
            )
        blocks[i] = wrapped.to(device=weight.device, dtype=weight.dtype).train(block.training)
    embed.__class__ = _grid_recording(type(embed))
    embed.dge_grid = grid
    new = sum(p.numel() for b in blocks if b.router is not None for p in b.router.parameters())
    logger.info("dge.patch: %d blocks of %s wrapped; new tensors: blocks.*.router.* (%d parameters)",
                len(blocks), type(model).__name__, new)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes ``patch``: the original blocks (which share every tensor the patched model
    trained) and patch embedding class; the routers are dropped. Returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by dge.patch")
    for i, wrapped in enumerate(model.blocks):
        model.blocks[i] = wrapped.block.original
    model.patch_embed.__class__ = model.patch_embed.dge_base
    del model.patch_embed.dge_grid
    return model
