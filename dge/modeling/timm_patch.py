"""DGE as a plugin for timm's vision transformers, in place.

``patch(model, options)`` wraps every block of a timm ``VisionTransformer`` (ViT, DeiT III,
MAE, DINOv2 with registers and layer scale: timm's ``Block`` with its fused-qkv
``Attention``) in the one ``DynamicGrainedEncoder``; ``unpatch(model)`` puts the original
blocks back. ``TimmBlock`` supplies the block protocol (``dge.layers.block``) over the timm
block's own modules: queries take the q rows of the fused ``qkv`` projection, the dense
context its k and v rows, then timm's q/k norms, attention, projection, layer scales and MLP.

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
from typing import Any, Mapping, Optional, Tuple, Union

import torch
from timm.layers import Attention
from timm.models import register_notrace_module
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F

from dge.layers import DGEOptions, DynamicGrainedEncoder
from dge.layers.attention import attend
from dge.layers.block import drop_path_rows
from dge.layers.grained import QueryRows

__all__ = ["patch", "unpatch", "is_patched", "TimmBlock", "TokenGrid"]

logger = logging.getLogger(__name__)


class TokenGrid:
    """The patch grid (H, W) of a patched model's latest forward: written by its patch
    embedding, read by its blocks."""

    def __init__(self):
        self.hw: Optional[Tuple[int, int]] = None


@functools.lru_cache(maxsize=None)
def _grid_recording(cls: type) -> type:
    """A subclass of the patch embedding ``cls`` whose forward also records the grid."""

    def forward(self, x, *args, **kwargs):
        self.dge_grid.hw = tuple(self.dynamic_feat_size((x.shape[-2], x.shape[-1])))
        return cls.forward(self, x, *args, **kwargs)

    recording = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "dge_base": cls})
    register_notrace_module(recording)  # an FX leaf: a traced model runs the recording too
    return recording


def _check_block(block: nn.Module, index: int) -> None:
    """timm's Block and Attention (or subclasses that keep their forward): the computation
    ``TimmBlock`` re-composes from their parts."""
    attn = getattr(block, "attn", None)
    if type(block).forward is not Block.forward or type(attn).forward is not Attention.forward:
        raise TypeError(
            f"dge.patch supports timm's Block with its fused-qkv Attention (ViT, DeiT III, MAE, DINOv2); "
            f"block {index} is {type(block).__name__} with {type(attn).__name__}"
        )
    if getattr(attn, "gate", None) is not None:
        raise TypeError(f"dge.patch: block {index} has a gated attention, which it does not support")


class TimmBlock(nn.Module):
    """A timm ``Block`` in the block protocol: its modules (same names, same tensors) and
    ``forward_queries``; ``forward(x, hw)`` is the original block. ``grid`` gives the map
    size the model's caller does not pass."""

    def __init__(self, block: nn.Module, grid: TokenGrid):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self._original = (block,)  # a tuple: not a submodule, no second set of keys
        self._grid = grid
        self.dim = self.attn.qkv.in_features

    @property
    def original(self) -> nn.Module:
        """The timm block this adapter was made from (it shares every module)."""
        return self._original[0]

    def token_grid(self) -> Tuple[int, int]:
        if self._grid.hw is None:
            raise RuntimeError("a patched timm block ran before its model's patch embedding recorded the grid")
        return self._grid.hw

    def forward(self, x: torch.Tensor, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return self.original(x)

    def forward_queries(
        self,
        queries: torch.Tensor,
        context: torch.Tensor,
        hw: Tuple[int, int],
        query_centers: Optional[torch.Tensor] = None,
        rows: Optional[QueryRows] = None,
    ) -> torch.Tensor:
        q = self.norm1(queries)
        ctx = q if context is queries else self.norm1(context)
        x = queries + drop_path_rows(self.drop_path1, self.ls1(self._attention(q, ctx, rows)), rows)
        return x + drop_path_rows(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), rows)

    def _attention(self, queries: torch.Tensor, context: torch.Tensor, rows: Optional[QueryRows]) -> torch.Tensor:
        """timm's Attention with queries apart from the context: the q rows of ``qkv`` on the
        queries, its k and v rows on the context."""
        attn = self.attn
        heads, d = attn.num_heads, attn.head_dim
        a, weight, bias = heads * d, attn.qkv.weight, attn.qkv.bias
        q = F.linear(queries, weight[:a], None if bias is None else bias[:a])
        kv = F.linear(context, weight[a:], None if bias is None else bias[a:])
        q = attn.q_norm(q.view(q.shape[0], q.shape[1], heads, d).transpose(1, 2))
        kv = kv.view(context.shape[0], context.shape[1], 2, heads, d).permute(2, 0, 3, 1, 4)
        x = attend(q, attn.k_norm(kv[0]), kv[1], rows, attn.attn_drop.p if self.training else 0.0)
        x = attn.norm(x)
        return attn.proj_drop(attn.proj(x))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> Tuple[float, float]:
        """(fixed, per_query) multiply-adds, fvcore's convention (LayerNorm 5 per element;
        softmax, GELU, layer scales, additions 0). Fixed: ``norm1`` of the context, the k and
        v projections and the k norm; per query: everything else."""
        n = hw[0] * hw[1] + num_extra
        c, a = self.dim, self.attn.num_heads * self.attn.head_dim
        fixed = n * (_norm_cost(self.norm1, c) + 2 * c * a + _norm_cost(self.attn.k_norm, a))
        per_query = _norm_cost(self.norm1, c) + c * a + _norm_cost(self.attn.q_norm, a) + 2.0 * n * a
        per_query += _norm_cost(self.attn.norm, a) + _linear_cost(self.attn.proj)
        return fixed, per_query + _norm_cost(self.norm2, c) + _linear_cost(self.mlp)


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
    options = DGEOptions.coerce(options) or DGEOptions()
    grid = TokenGrid()
    for i, block in enumerate(blocks):
        weight = block.attn.qkv.weight
        wrapped = DynamicGrainedEncoder(TimmBlock(block, grid), weight.shape[1], options, model.num_prefix_tokens)
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
