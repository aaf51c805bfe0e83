"""Pyramid Vision Transformer (PVT v1) and DPVT, with or without Dynamic Grained Encoders.

One pyramid serves both frameworks of the paper (Sec. 4): PVT uses spatial-reduction
attention, DPVT the same pyramid with single-scale deformable attention (4 points per
head, no spatial reduction). Each stage is a ``PyramidStage`` (patch embedding, position
embedding resampled bilinearly to the input's grid, encoder blocks); with DGE every block
is wrapped by a ``DynamicGrainedEncoder``.

Front doors: the timm models registered at the bottom (``pvt_small``, ``pvt_small_dge``,
``dpvt_small``, ...) and the detectron2 backbone of ``dge.detectron2.backbone``; ``convert.py`` maps official
PVT v1 and vtpack checkpoints onto this file's parameter names.
"""
import math
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from dge.layers import ATTENTION_KINDS, NORM_EPS, QKV_BIAS, DGEOptions

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

__all__ = ["PVT_SIZES", "PyramidStage", "PyramidVisionTransformer", "pvt_kwargs"]

# Official PVT v1 depths per size; every size shares the widths, heads, MLP and SR ratios below.
PVT_SIZES = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}
PVT_EMBED_DIMS = (64, 128, 320, 512)
PVT_NUM_HEADS = (1, 2, 5, 8)
PVT_MLP_RATIOS = (8.0, 8.0, 4.0, 4.0)
PVT_SR_RATIOS = (8, 4, 2, 1)
PVT_PATCH_SIZES = (4, 2, 2, 2)


def pvt_kwargs(size: str, attention: str = "sr") -> Dict:
    """Constructor arguments of ``PyramidVisionTransformer`` for a PVT / DPVT size."""
    if size not in PVT_SIZES:
        raise ValueError(f"PVT size must be one of {tuple(PVT_SIZES)}; got {size!r}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {tuple(ATTENTION_KINDS)}; got {attention!r}")
    return dict(
        depths=PVT_SIZES[size],
        embed_dims=PVT_EMBED_DIMS,
        num_heads=PVT_NUM_HEADS,
        mlp_ratios=PVT_MLP_RATIOS,
        sr_ratios=PVT_SR_RATIOS,
        attention=attention,
    )


class PyramidStage(nn.Module):
    """Patch embedding, (optional) class token, position embedding and encoder blocks.

    Args:
        pos_grid: (gh, gw) grid the position embedding is stored on (the pre-training input
            size divided by the stage's stride); other input sizes resample it bilinearly.
        num_extra_tokens: E, 1 for a class token prepended to the spatial tokens.
        drop_path: stochastic-depth rate of each block.
        dge: None for vanilla blocks, else the ``DGEOptions`` of every block.
    """

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        patch_size: int,
        pos_grid: Tuple[int, int],
        num_heads: int,
        mlp_ratio: float,
        attention: str = "sr",
        sr_ratio: int = 1,
        num_points: int = 4,
        qkv_bias: bool = QKV_BIAS,
        num_extra_tokens: int = 0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_eps: float = NORM_EPS,
        dge: Optional[DGEOptions] = None,
    ):
        super().__init__()
        self.attention_kind = attention
        self.pos_grid = tuple(pos_grid)
        self.num_extra_tokens = num_extra_tokens
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if num_extra_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_extra_tokens + pos_grid[0] * pos_grid[1], dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = build_blocks(
            dim, depth, num_heads, mlp_ratio, attention, sr_ratio, num_points, qkv_bias, drop_rate,
            attn_drop_rate, drop_path, norm_eps, num_extra_tokens, dge,
        )

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """x: [B, C_in, H, W] -> tokens [B, E + h*w, C], (h, w)."""
        tokens, hw = embed_tokens(x, self.patch_embed, self.pos_embed, self.pos_grid, self.cls_token)
        tokens = self.pos_drop(tokens)
        for blk in self.blocks:
            tokens = blk(tokens, hw)
        return tokens, hw


class PyramidVisionTransformer(TokenModel):
    """PVT v1 / DPVT (optionally with DGE) in timm's model shape.

    Args:
        img_size: input size the position embeddings are stored for (256 in the paper, 224
            for the official PVT v1 weights); any input of at least 32×32 pixels runs.
        global_pool: "token" (PVT v1: a class token joins the last stage), "avg" (mean of
            the last stage's tokens, DPVT) or "" (no pooling).
        attention: "sr" (PVT) or "deformable" (DPVT).
        dge: None / False (vanilla), True (DGE with the defaults), a ``DGEOptions`` or a
            mapping of its fields (granularities, region_size, routing, ...).
    """

    feature_layers = "stages"  # timm's feature API: one map per stage
    pruned_pool = ""

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 256,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        depths: Sequence[int] = PVT_SIZES["small"],
        embed_dims: Sequence[int] = PVT_EMBED_DIMS,
        num_heads: Sequence[int] = PVT_NUM_HEADS,
        mlp_ratios: Sequence[float] = PVT_MLP_RATIOS,
        sr_ratios: Sequence[int] = PVT_SR_RATIOS,
        patch_sizes: Sequence[int] = PVT_PATCH_SIZES,
        attention: str = "sr",
        num_points: int = 4,
        qkv_bias: bool = QKV_BIAS,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = NORM_EPS,
        dge: Union[None, bool, Mapping, DGEOptions] = None,
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be one of ('token', 'avg', ''); got {global_pool!r}")
        img_size = to_2tuple(img_size)
        dge = DGEOptions.coerce(dge)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        num_stages = len(depths)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        shared = dict(
            attention=attention, num_points=num_points, qkv_bias=qkv_bias, drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, norm_eps=norm_eps, dge=dge,
        )
        stages, self.feature_info = [], []
        stride, cur, prev = 1, 0, in_chans
        for i in range(num_stages):
            stride *= patch_sizes[i]
            grid = (img_size[0] // stride, img_size[1] // stride)
            extra = 1 if global_pool == "token" and i == num_stages - 1 else 0  # PVT v1: class token in the last stage
            stages.append(
                PyramidStage(
                    prev, embed_dims[i], depths[i], patch_sizes[i], grid, num_heads[i], mlp_ratios[i],
                    sr_ratio=sr_ratios[i], num_extra_tokens=extra, drop_path=dpr[cur : cur + depths[i]], **shared,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            cur += depths[i]
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self._set_head(num_classes)
        init_transformer_weights(self)

    @property
    def min_input_size(self) -> int:
        return math.prod(s.patch_size for s in self.stages)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith("cls_token")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(stem=r"^stages\.0\.(patch_embed|pos_embed)", blocks=r"^stages\.(\d+)")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            has_token = self.stages[-1].num_extra_tokens > 0
            if global_pool not in ("token", "avg", "") or (global_pool == "token" and not has_token):
                allowed = ("token", "avg", "") if has_token else ("avg", "")
                raise ValueError(f"global_pool must be one of {allowed} for this model; got {global_pool!r}")
            self.global_pool = global_pool
        self._set_head(num_classes)

    def _intermediates(self, x, stages, take_indices, norm):
        """Per-stage maps [B, C_i, H/s_i, W/s_i] (``norm`` is not applied to them: PVT v1 has no
        per-stage norms)."""
        check_input_size(x, self.min_input_size, type(self).__name__)
        tokens, maps = x, []
        for i, stage in enumerate(stages):
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, stage.num_extra_tokens)
            if i in take_indices:
                maps.append(x.contiguous())
        return tokens, maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> normalised last-stage tokens [B, E + h*w, C] (E = 1 with a class token)."""
        check_input_size(x, self.min_input_size, type(self).__name__)
        tokens = x
        for stage in self.stages:
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, stage.num_extra_tokens)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.stages[-1].num_extra_tokens :].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


# ---------------------------------------------------------------------------- timm registry
def _create_pvt(variant: str, pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    return build_model_with_cfg(
        PyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs) -> Dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 256, 256),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        f"{family}_{size}{suffix}": _cfg()
        for family in ("pvt", "dpvt")
        for size in (PVT_SIZES if family == "pvt" else ("tiny", "small", "medium"))
        for suffix in ("", "_dge")
    }
)


def _pvt(variant: str, size: str, pretrained: bool, kwargs: Dict) -> PyramidVisionTransformer:
    """PVT v1 (``pvt_*``: spatial-reduction attention, class token) or DPVT (``dpvt_*``:
    deformable attention, average pooling) of ``size``; ``*_dge``: with DGE."""
    attention = "deformable" if variant.startswith("dpvt") else "sr"
    args = dict(pvt_kwargs(size, attention), global_pool="avg" if attention == "deformable" else "token")
    if variant.endswith("_dge"):
        args["dge"] = True
    return _create_pvt(variant, pretrained, **dict(args, **kwargs))


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_tiny", "tiny", pretrained, kwargs)


@register_model
def pvt_tiny_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_small", "small", pretrained, kwargs)


@register_model
def pvt_small_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_small_dge", "small", pretrained, kwargs)


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_medium", "medium", pretrained, kwargs)


@register_model
def pvt_medium_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_medium_dge", "medium", pretrained, kwargs)


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_large", "large", pretrained, kwargs)


@register_model
def pvt_large_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_large_dge", "large", pretrained, kwargs)


@register_model
def dpvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_tiny", "tiny", pretrained, kwargs)


@register_model
def dpvt_tiny_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def dpvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_small", "small", pretrained, kwargs)


@register_model
def dpvt_small_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_small_dge", "small", pretrained, kwargs)


@register_model
def dpvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_medium", "medium", pretrained, kwargs)


@register_model
def dpvt_medium_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_medium_dge", "medium", pretrained, kwargs)
