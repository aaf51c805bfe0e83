"""DeiT (ViT with a class token, patch 16, global attention), with or without DGE.

The patch embedding (no norm), class token, position embedding and blocks (global attention)
are the shared parts of ``parts.py``; then a final norm and the head. Parameter names are
timm's DeiT names except that the fused ``attn.qkv`` is stored as ``attn.q`` and ``attn.kv``
(as vtpack's DGE models); ``convert.py`` converts timm / official DeiT and vtpack checkpoints.

timm names: ``deit_tiny_vanilla`` / ``deit_small_vanilla`` (no DGE; the paper's 256×256
input) and ``deit_tiny_dge`` / ``deit_small_dge``. Features (``features_only``,
``forward_intermediates``) are the blocks' outputs as stride-16 maps.
"""
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from dge.layers import NORM_EPS, QKV_BIAS, DGEOptions

from .convert import checkpoint_filter_fn
from .parts import (
    PatchEmbed,
    build_blocks,
    check_input_size,
    embed_tokens,
    init_transformer_weights,
    TokenModel,
    tokens_to_map,
)

__all__ = ["DeiT", "DEIT_SIZES"]

# (embed_dim, num_heads) per size; depth 12, MLP ratio 4, patch 16.
DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6)}


class DeiT(TokenModel):
    """DeiT-Ti / DeiT-S.

    Args:
        img_size: input size the position embedding is stored for (256 in the paper).
        global_pool: "token" (the class token) or "avg" (mean of the spatial tokens).
        dge: None / False, True, a ``DGEOptions`` or a mapping of its fields; the class
            token is the one extra token every DGE block keeps as a query.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 256,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = QKV_BIAS,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = NORM_EPS,
        dge: Union[None, bool, Mapping, DGEOptions] = None,
    ):
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be one of ('token', 'avg'); got {global_pool!r}")
        super().__init__()
        img_size = to_2tuple(img_size)
        self.pos_grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_extra_tokens = 1
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, norm=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = build_blocks(
            embed_dim, depth, num_heads, mlp_ratio, "sr", 1, qkv_bias=qkv_bias, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path=torch.linspace(0, drop_path_rate, depth).tolist(),
            norm_eps=norm_eps, num_extra_tokens=1, dge=DGEOptions.coerce(dge),
        )
        self.feature_info = [
            dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)
        ]
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self._set_head(num_classes)
        init_transformer_weights(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be one of ('token', 'avg'); got {global_pool!r}")
            self.global_pool = global_pool
        self._set_head(num_classes)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        check_input_size(x, self.patch_size, type(self).__name__)
        tokens, hw = embed_tokens(x, self.patch_embed, self.pos_embed, self.pos_grid, self.cls_token)
        return self.pos_drop(tokens), hw

    def _intermediates(self, x, blocks, take_indices, norm):
        """Block outputs as maps [B, C, H/16, W/16] (class token dropped; ``norm`` applies the
        final norm to each)."""
        tokens, hw = self._embed(x)
        maps = []
        for i, blk in enumerate(blocks):
            tokens = blk(tokens, hw)
            if i in take_indices:
                maps.append(tokens_to_map(self.norm(tokens) if norm else tokens, hw, 1).contiguous())
        return tokens, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> normalised tokens [B, 1 + (H/16)*(W/16), C]."""
        tokens, hw = self._embed(x)
        for blk in self.blocks:
            tokens = blk(tokens, hw)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _create_deit(variant: str, size: str, pretrained: bool, kwargs: Dict) -> DeiT:
    dim, heads = DEIT_SIZES[size]
    args = dict(embed_dim=dim, num_heads=heads, dge=variant.endswith("_dge"))
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        DeiT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **dict(args, **kwargs),
    )


default_cfgs = generate_default_cfgs(
    {
        name: {
            "url": "",
            "num_classes": 1000,
            "input_size": (3, 256, 256),
            "pool_size": None,
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "fixed_input_size": False,
            "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
        for name in ("deit_tiny_vanilla", "deit_small_vanilla", "deit_tiny_dge", "deit_small_dge")
    }
)


@register_model
def deit_tiny_vanilla(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_tiny_vanilla", "tiny", pretrained, kwargs)


@register_model
def deit_small_vanilla(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_small_vanilla", "small", pretrained, kwargs)


@register_model
def deit_tiny_dge(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def deit_small_dge(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_small_dge", "small", pretrained, kwargs)
