"""Pyramid Vision Transformer (PVT v1) and DPVT, with or without Dynamic Grained Encoders.

One pyramid serves both frameworks of the paper (Sec. 4): PVT uses spatial-reduction
attention, DPVT the same pyramid with single-scale deformable attention (4 points per
head, no spatial reduction). Each stage is a ``PyramidStage`` (patch embedding, position
embedding resampled bilinearly to the input's grid, encoder blocks); with DGE every block
is wrapped by a ``DynamicGrainedEncoder``.

Front doors: the timm models registered at the bottom (``pvt_small``, ``pvt_small_dge``,
``dpvt_small``, ...) and the detectron2 backbone of ``d2.py``. ``checkpoint_filter_fn``
maps official PVT v1 and vtpack checkpoints onto this file's parameter names.
"""
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn import functional as F

from dge.layers import (
    DeformableAttention,
    DynamicGrainedEncoder,
    EncoderBlock,
    GrainedRouter,
    SpatialReductionAttention,
    token_centers,
)

__all__ = [
    "ATTENTION_KINDS",
    "PVT_SIZES",
    "Conversion",
    "PatchEmbed",
    "PyramidStage",
    "PyramidVisionTransformer",
    "checkpoint_filter_fn",
    "convert_pvt_state_dict",
    "pvt_kwargs",
]

logger = logging.getLogger(__name__)

ATTENTION_KINDS = ("sr", "deformable")
# Official PVT v1 depths per size; every size shares the widths, heads, MLP and SR ratios below.
PVT_SIZES = {"tiny": (2, 2, 2, 2), "small": (3, 4, 6, 3), "medium": (3, 4, 18, 3), "large": (3, 8, 27, 3)}
PVT_EMBED_DIMS = (64, 128, 320, 512)
PVT_NUM_HEADS = (1, 2, 5, 8)
PVT_MLP_RATIOS = (8.0, 8.0, 4.0, 4.0)
PVT_SR_RATIOS = (8, 4, 2, 1)
PVT_PATCH_SIZES = (4, 2, 2, 2)
DGE_OPTIONS = ("granularities", "region_size", "routing", "gumbel_tau", "dense_train", "init_fine_prob")


def pvt_kwargs(size: str, attention: str = "sr") -> Dict:
    """Constructor arguments of ``PyramidVisionTransformer`` for a PVT / DPVT size."""
    if size not in PVT_SIZES:
        raise ValueError(f"PVT size must be one of {tuple(PVT_SIZES)}; got {size!r}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}")
    return dict(
        depths=PVT_SIZES[size],
        embed_dims=PVT_EMBED_DIMS,
        num_heads=PVT_NUM_HEADS,
        mlp_ratios=PVT_MLP_RATIOS,
        sr_ratios=PVT_SR_RATIOS,
        attention=attention,
    )


def dge_options(dge: Union[None, bool, Mapping]) -> Optional[Dict]:
    """None / False: no DGE; True: the layer's defaults; a mapping: DynamicGrainedEncoder options."""
    if dge is None or dge is False:
        return None
    if dge is True:
        return {}
    unknown = sorted(set(dge) - set(DGE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown DGE options {unknown}; allowed: {DGE_OPTIONS}")
    return dict(dge)


def make_attention(
    kind: str,
    dim: int,
    num_heads: int,
    sr_ratio: int = 1,
    num_points: int = 4,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
) -> nn.Module:
    """The vanilla attention of one block: "sr" (PVT; ``sr_ratio=1`` is global attention) or
    "deformable" (DPVT)."""
    if kind == "sr":
        return SpatialReductionAttention(
            dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio, attn_drop=attn_drop, proj_drop=proj_drop
        )
    if kind == "deformable":
        return DeformableAttention(
            dim, num_heads, num_points=num_points, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop
        )
    raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {kind!r}")


def resample_pos_embed(
    pos_embed: torch.Tensor, grid: Tuple[int, int], hw: Tuple[int, int], num_extra: int = 0
) -> torch.Tensor:
    """pos_embed [1, E + gh*gw, C] laid out on ``grid`` -> [1, E + h*w, C] for an h×w map:
    the spatial part is resized bilinearly (align_corners=False, as official PVT), the E
    extra-token positions are kept."""
    if tuple(grid) == tuple(hw):
        return pos_embed
    extra, spatial = pos_embed[:, :num_extra], pos_embed[:, num_extra:]
    c = spatial.shape[-1]
    spatial = spatial.reshape(1, grid[0], grid[1], c).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=tuple(hw), mode="bilinear", align_corners=False)
    spatial = spatial.flatten(2).transpose(1, 2)
    return torch.cat([extra, spatial], dim=1) if num_extra else spatial


def check_input_size(hw: Tuple[int, int], min_size: int, what: str) -> None:
    if hw[0] < min_size or hw[1] < min_size:
        raise ValueError(
            f"{what} needs inputs of at least {min_size}×{min_size} pixels (the total stride of its "
            f"patch embeddings); got {hw[0]}×{hw[1]}"
        )


def init_transformer_weights(model: nn.Module) -> None:
    """Official PVT / DeiT initialisation: truncated-normal (std 0.02) Linear weights with zero
    biases, unit LayerNorms, truncated-normal position embeddings and class tokens. DGE routers
    and deformable sampling offsets keep the initialisation their modules give them."""
    own_init = set()
    for m in model.modules():
        if isinstance(m, GrainedRouter):
            own_init.add(m.gate)
        elif isinstance(m, DeformableAttention):
            own_init.add(m.offsets)
    for m in model.modules():
        if m in own_init:
            continue
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in model.named_parameters():
        if name.endswith(("pos_embed", "cls_token")):
            trunc_normal_(p, std=0.02)


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: a patch×patch conv with stride patch, then LayerNorm
    (PVT v1; its LayerNorm keeps PyTorch's eps 1e-5) or nothing (DeiT)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """x: [B, C_in, H, W] -> tokens [B, h*w, C], (h, w) = (H // patch, W // patch).

        The conv runs channels-last (a token map from ``tokens_to_map`` already is; an image
        is converted): on 2 CPU cores it is 1.5-2x faster than on NCHW, and its output
        flattens to contiguous tokens without a transpose copy."""
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


class PyramidStage(nn.Module):
    """Patch embedding, (optional) class token, position embedding and encoder blocks.

    Args:
        pos_grid: (gh, gw) grid the position embedding is stored on (the pre-training input
            size divided by the stage's stride); other input sizes resample it bilinearly.
        num_extra_tokens: E, 1 for a class token prepended to the spatial tokens.
        drop_path: stochastic-depth rate of each block.
        dge: None for vanilla blocks, else DynamicGrainedEncoder options (``dge_options``).
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
        qkv_bias: bool = True,
        num_extra_tokens: int = 0,
        patch_norm: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path: Sequence[float] = (),
        norm_eps: float = 1e-6,
        dge: Optional[Mapping] = None,
    ):
        super().__init__()
        drop_path = list(drop_path) or [0.0] * depth
        self.attention_kind = attention
        self.pos_grid = tuple(pos_grid)
        self.num_extra_tokens = num_extra_tokens
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size, norm=patch_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if num_extra_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_extra_tokens + pos_grid[0] * pos_grid[1], dim))
        self.pos_drop = nn.Dropout(drop_rate)
        blocks = []
        for j in range(depth):
            attn = make_attention(
                attention, dim, num_heads, sr_ratio, num_points, qkv_bias, attn_drop_rate, drop_rate
            )
            block = EncoderBlock(dim, attn, mlp_ratio, drop=drop_rate, drop_path=drop_path[j], norm_eps=norm_eps)
            if dge is not None:
                block = DynamicGrainedEncoder(block, dim, num_extra_tokens=num_extra_tokens, **dge)
            blocks.append(block)
        self.blocks = nn.ModuleList(blocks)
        self.uses_dge = dge is not None

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """x: [B, C_in, H, W] -> tokens [B, E + h*w, C], (h, w)."""
        tokens, hw = self.patch_embed(x)
        b = tokens.shape[0]
        e = self.num_extra_tokens
        if e:
            tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = self.pos_drop(tokens + resample_pos_embed(self.pos_embed, self.pos_grid, hw, e))
        if self.uses_dge:
            for blk in self.blocks:
                tokens = blk(tokens, hw)
            return tokens, hw
        centers = token_centers(hw[0], hw[1], device=tokens.device).expand(b, -1, -1)  # float32 positions
        if e:
            centers = torch.cat([centers.new_zeros(b, e, 2), centers], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens, tokens, hw, centers)
        return tokens, hw


def tokens_to_map(tokens: torch.Tensor, hw: Tuple[int, int], num_extra: int = 0) -> torch.Tensor:
    """[B, E + h*w, C] -> [B, C, h, w] (the spatial tokens) as a channels-last view: no copy.
    Call ``.contiguous()`` for an NCHW-contiguous map."""
    b, _, c = tokens.shape
    return tokens[:, num_extra:].reshape(b, hw[0], hw[1], c).permute(0, 3, 1, 2)


class PyramidVisionTransformer(nn.Module):
    """PVT v1 / DPVT (optionally with DGE) in timm's model shape.

    Args:
        img_size: input size the position embeddings are stored for (256 in the paper, 224
            for the official PVT v1 weights); any input of at least 32×32 pixels runs.
        global_pool: "token" (PVT v1: a class token joins the last stage), "avg" (mean of
            the last stage's tokens, DPVT) or "" (no pooling).
        attention: "sr" (PVT) or "deformable" (DPVT).
        dge: None / False (vanilla), True (DGE with the layer's defaults) or a mapping of
            DynamicGrainedEncoder options (granularities, region_size, routing, ...).
    """

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
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        dge: Union[None, bool, Mapping] = None,
    ):
        super().__init__()
        if global_pool not in ("token", "avg", ""):
            raise ValueError(f"global_pool must be one of ('token', 'avg', ''); got {global_pool!r}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}; got {attention!r}")
        img_size = to_2tuple(img_size)
        dge = dge_options(dge)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        num_stages = len(depths)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, self.feature_info = [], []
        stride, cur, prev = 1, 0, in_chans
        for i in range(num_stages):
            stride *= patch_sizes[i]
            stages.append(
                PyramidStage(
                    prev,
                    embed_dims[i],
                    depths[i],
                    patch_sizes[i],
                    (img_size[0] // stride, img_size[1] // stride),
                    num_heads[i],
                    mlp_ratios[i],
                    attention=attention,
                    sr_ratio=sr_ratios[i],
                    num_points=num_points,
                    qkv_bias=qkv_bias,
                    num_extra_tokens=1 if global_pool == "token" and i == num_stages - 1 else 0,
                    drop_rate=drop_rate,
                    attn_drop_rate=attn_drop_rate,
                    drop_path=dpr[cur : cur + depths[i]],
                    norm_eps=norm_eps,
                    dge=dge,
                )
            )
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=stride, module=f"stages.{i}"))
            cur += depths[i]
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = nn.LayerNorm(embed_dims[-1], eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
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

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            has_token = self.stages[-1].num_extra_tokens > 0
            if global_pool not in ("token", "avg", "") or (global_pool == "token" and not has_token):
                allowed = ("token", "avg", "") if has_token else ("avg", "")
                raise ValueError(f"global_pool must be one of {allowed} for this model; got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Per-stage maps [B, C_i, H/s_i, W/s_i] (timm's feature API; ``norm`` is not applied to
        intermediates, PVT v1 has no per-stage norms). Returns the maps, or (final tokens after
        the norm, maps) unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW'; got {output_fmt!r}")
        check_input_size(tuple(x.shape[-2:]), self.min_input_size, type(self).__name__)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[: max_index + 1] if stop_early or intermediates_only else self.stages
        intermediates = []
        tokens = x
        for i, stage in enumerate(stages):
            tokens, hw = stage(x)
            x = tokens_to_map(tokens, hw, stage.num_extra_tokens)
            if i in take_indices:
                intermediates.append(x.contiguous())
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> normalised last-stage tokens [B, E + h*w, C] (E = 1 with a class token)."""
        check_input_size(tuple(x.shape[-2:]), self.min_input_size, type(self).__name__)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------- checkpoints
@dataclass
class Conversion:
    """A checkpoint mapped onto a model's parameter names, and what happened on the way.

    Attributes:
        state_dict: converted tensors (router rows ordered as the model's Φ).
        source: the layout recognised, e.g. "official PVT v1".
        dropped: checkpoint key -> why the model does not use it (never silent).
        resampled: model key -> "gh×gw -> gh'×gw'" position embeddings resized bilinearly.
        missing: model keys the checkpoint does not provide.
        unexpected: converted keys the model does not have.
        initial_routers: router keys left at (or filled with) the model's initial values.
    """

    state_dict: Dict[str, torch.Tensor]
    source: str
    dropped: Dict[str, str] = field(default_factory=dict)
    resampled: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    initial_routers: List[str] = field(default_factory=list)

    def log(self, log: logging.Logger = logger) -> None:
        log.info(f"checkpoint layout: {self.source}; {len(self.state_dict)} tensors converted")
        for key, why in self.dropped.items():
            log.info(f"not used by the model: {key} ({why})")
        for key, how in self.resampled.items():
            log.info(f"position embedding {key} resampled bilinearly: {how}")
        if self.initial_routers:
            log.warning(
                f"the checkpoint has no DGE routers: {len(self.initial_routers)} router tensors "
                f"(e.g. {self.initial_routers[0]}) are left at their initial values"
            )
        other_missing = [k for k in self.missing if k not in self.initial_routers]
        if other_missing:
            log.warning(f"missing in the checkpoint ({len(other_missing)}): {', '.join(other_missing)}")
        if self.unexpected:
            log.warning(f"unexpected in the checkpoint ({len(self.unexpected)}): {', '.join(self.unexpected)}")


def unwrap_checkpoint(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint file's object ("model" / "state_dict" entries, DDP's
    "module." prefix removed)."""
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            checkpoint = checkpoint[key]
            break
    out = {}
    for k, v in checkpoint.items():
        if not isinstance(v, torch.Tensor):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _square_grid(n: int) -> Optional[int]:
    side = math.isqrt(n)
    return side if side * side == n else None


def _dge_wrappers(model: nn.Module) -> Dict[str, DynamicGrainedEncoder]:
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)}


def _into_wrapper(key: str, wrappers: Mapping[str, DynamicGrainedEncoder]) -> str:
    """A block key -> its name in the model: inside the DGE wrapper at that place (``.block.``
    added) or, for a DGE checkpoint of this project in a vanilla model, ``.block.`` removed."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if prefix in wrappers:
            return key if parts[i] in ("block", "router", "splits") else ".".join(parts[:i] + ["block"] + parts[i:])
        if parts[i] == "block" and parts[i - 1].isdigit() and i + 1 < len(parts):
            return ".".join(parts[:i] + parts[i + 1 :])
    return key


def _owner(model: nn.Module, key: str) -> nn.Module:
    return model.get_submodule(key.rpartition(".")[0]) if "." in key else model


def finish_conversion(
    converted: Dict[str, torch.Tensor],
    model: nn.Module,
    conversion: Conversion,
    fill_routers: bool = False,
) -> Conversion:
    """Shared last steps for every layout: DGE wrapper names, vtpack router rows (``.splits``),
    position-embedding grids, classifier shape, shape check, missing / unexpected keys.

    ``converted`` holds keys in this project's vanilla naming (``stages.0.blocks.1.attn.q.weight``,
    ``blocks.3.router.gate.weight``, ``<block>.splits`` for vtpack's split sizes)."""
    wrappers = _dge_wrappers(model)
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    splits: Dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        key = _into_wrapper(key, wrappers)
        if ".router." in key and key.partition(".router.")[0] not in wrappers:
            conversion.dropped[key] = "DGE router; the model has no DGE block here"
            continue
        if key.endswith(".splits"):
            splits[key[: -len(".splits")]] = value
            continue
        out[key] = value

    # vtpack routers: row k of the gate belongs to the split size splits[k], i.e. the
    # granularity S / splits[k]; reorder rows to the model's ascending Φ.
    for name, split in splits.items():
        if name not in wrappers:
            conversion.dropped[name + ".splits"] = "DGE split sizes, but the model has no DGE block here"
            continue
        split = [int(s) for s in split.tolist()]
        region = max(split)
        phi = [region // s for s in split]
        wrapper = wrappers[name]
        if sorted(phi) != list(wrapper.granularities) or region != wrapper.region_size:
            raise ValueError(
                f"{name}: the checkpoint's router was trained for granularities {tuple(sorted(phi))} in "
                f"regions of {region}; the model has {wrapper.granularities} in regions of {wrapper.region_size}"
            )
        order = [phi.index(g) for g in wrapper.granularities]
        for p in ("weight", "bias"):
            key = f"{name}.router.gate.{p}"
            if key in out:
                out[key] = out[key][order]

    for key in [k for k in out if k.endswith("pos_embed")]:
        if key not in target:
            continue
        owner = _owner(model, key)
        grid, extra = owner.pos_grid, owner.num_extra_tokens
        value = out[key]
        n = value.shape[1]
        side = _square_grid(n - extra)
        if side is None and extra == 0 and _square_grid(n - 1):
            value, side = value[:, 1:], _square_grid(n - 1)
            conversion.dropped[key + "[0]"] = "class-token position; the model has no class token"
        if side is None:
            raise ValueError(
                f"{key}: cannot read a square position grid from {n} positions with {extra} extra token(s)"
            )
        if (side, side) != tuple(grid):
            value = resample_pos_embed(value, (side, side), grid, extra)
            conversion.resampled[key] = f"{side}×{side} -> {grid[0]}×{grid[1]}"
        out[key] = value

    for key in [k for k in out if k.startswith("head.")]:
        if key in target and out[key].shape != target[key].shape:
            conversion.dropped[key] = (
                f"classifier for {out[key].shape[0]} classes; the model has {target[key].shape[0]}"
            )
            del out[key]
    bad = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(target[k].shape)}"
        for k, v in out.items()
        if k in target and v.shape != target[k].shape
    ]
    if bad:
        raise ValueError(
            f"{conversion.source} checkpoint does not fit the model ({len(bad)} shape mismatches): "
            + "; ".join(bad[:5])
        )
    conversion.missing = [k for k in target if k not in out]
    conversion.unexpected = [k for k in out if k not in target]
    conversion.initial_routers = [k for k in conversion.missing if ".router." in k]
    if fill_routers:
        for k in conversion.initial_routers:
            out[k] = target[k]
    conversion.state_dict = out
    return conversion


_PVT_STAGE_KEY = re.compile(r"^(patch_embed|pos_embed|block)(\d)(.*)$")
_PVT_BLOCK_KEY = re.compile(r"^\.(\d+)\.(.*)$")


def _model_stages(model: nn.Module) -> nn.ModuleList:
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList) or not all(isinstance(s, PyramidStage) for s in stages):
        raise ValueError(f"expected a model with PyramidStage stages (pvt.py); got {type(model).__name__}")
    return stages


def convert_pvt_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, fill_routers: bool = False
) -> Conversion:
    """Map an official PVT v1 (``patch_embed1``, ``pos_embed1``, ``block1.0.*``, ``norm``,
    ``head``, ``cls_token``), vtpack PVT / PVT+DGE / DPVT (``block1.0.dge.router.gate.*``,
    ``block1.0.dge.splits``) or this project's checkpoint onto ``model``'s names.

    ``model`` is a ``PyramidVisionTransformer`` or anything with its ``stages`` (the
    detectron2 backbone). Raises ValueError for a checkpoint of another architecture, other
    depths, another attention kind or other shapes; ``fill_routers`` copies the model's
    initial router weights for a checkpoint without routers (timm's strict loading)."""
    state_dict = unwrap_checkpoint(state_dict)
    stages = _model_stages(model)
    keys = list(state_dict)
    if any(k.startswith("stages.") for k in keys):
        conversion = Conversion({}, "dge (this project)")
        return finish_conversion(dict(state_dict), model, conversion, fill_routers)
    if not any(_PVT_STAGE_KEY.match(k) for k in keys):
        if any(k.startswith("blocks.") for k in keys) or "patch_embed.proj.weight" in state_dict:
            raise ValueError(
                "this is a DeiT / ViT checkpoint (keys 'patch_embed.proj.*', 'blocks.N.*'); a PVT / DPVT "
                "model needs an official PVT v1 or vtpack checkpoint ('patch_embed1.*', 'block1.0.*') "
                "or one of this project's ('stages.0.*')"
            )
        raise ValueError(
            f"unrecognised checkpoint layout (first keys: {keys[:4]}); a PVT / DPVT model needs an official "
            "PVT v1 or vtpack checkpoint ('patch_embed1.*', 'block1.0.*') or one of this project's ('stages.0.*')"
        )

    deformable = any(".attn.offsets." in k for k in keys)
    has_dge = any(".dge." in k for k in keys)
    source = "vtpack DPVT" if deformable else ("vtpack PVT+DGE" if has_dge else "official PVT v1")
    if has_dge and deformable:
        source = "vtpack DPVT+DGE"
    kind = "deformable" if deformable else "sr"
    if stages[0].attention_kind != kind:
        raise ValueError(
            f"the checkpoint is a {source} checkpoint ({kind!r} attention); the model uses "
            f"{stages[0].attention_kind!r} attention"
        )
    depths: Dict[int, int] = {}
    for k in keys:
        m = re.match(r"^block(\d)\.(\d+)\.", k)
        if m:
            s = int(m.group(1)) - 1
            depths[s] = max(depths.get(s, 0), int(m.group(2)) + 1)
    model_depths = [len(s.blocks) for s in stages]
    common = range(min(len(model_depths), max(depths, default=-1) + 1))
    if [depths.get(s, 0) for s in common] != [model_depths[s] for s in common]:
        raise ValueError(
            f"the checkpoint has block depths {tuple(depths[s] for s in sorted(depths))}; the model has "
            f"{tuple(model_depths)}"
        )

    conversion = Conversion({}, source)
    converted: Dict[str, torch.Tensor] = {}
    target_keys = set(model.state_dict())
    last = len(stages) - 1
    for key, value in state_dict.items():
        m = _PVT_STAGE_KEY.match(key)
        if m:
            what, s, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
            if s > last:
                conversion.dropped[key] = f"stage {s + 1} is not part of this model"
                continue
            if what == "block":
                b = _PVT_BLOCK_KEY.match(rest)
                name = b.group(2).replace("dge.router.", "router.").replace("dge.splits", "splits")
                converted[f"stages.{s}.blocks.{b.group(1)}.{name}"] = value
            else:
                converted[f"stages.{s}.{what}{rest}"] = value
        elif key == "cls_token":
            if last == 3 and stages[last].num_extra_tokens:
                converted[f"stages.{last}.cls_token"] = value
            else:
                conversion.dropped[key] = "class token; the model has none (pooling 'avg' or a detection backbone)"
        elif key.startswith(("norm.", "head.")):
            if key in target_keys:
                converted[key] = value
            else:
                conversion.dropped[key] = "classification norm / head; not part of this model"
        else:
            converted[key] = value  # unknown: reported as unexpected
    return finish_conversion(converted, model, conversion, fill_routers)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: official PVT v1 / vtpack keys -> this model's, logged;
    missing routers take the model's initial values (timm loads strictly)."""
    conversion = convert_pvt_state_dict(state_dict, model, fill_routers=True)
    conversion.log()
    return conversion.state_dict


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
    attention = "deformable" if variant.startswith("dpvt") else "sr"
    args = dict(pvt_kwargs(size, attention), global_pool="avg" if attention == "deformable" else "token")
    if variant.endswith("_dge"):
        args["dge"] = True
    return _create_pvt(variant, pretrained, **dict(args, **kwargs))


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_tiny", "tiny", pretrained, kwargs)


@register_model
def pvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_small", "small", pretrained, kwargs)


@register_model
def pvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_medium", "medium", pretrained, kwargs)


@register_model
def pvt_large(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_large", "large", pretrained, kwargs)


@register_model
def pvt_tiny_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def pvt_small_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_small_dge", "small", pretrained, kwargs)


@register_model
def pvt_medium_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_medium_dge", "medium", pretrained, kwargs)


@register_model
def pvt_large_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("pvt_large_dge", "large", pretrained, kwargs)


@register_model
def dpvt_tiny(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_tiny", "tiny", pretrained, kwargs)


@register_model
def dpvt_small(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_small", "small", pretrained, kwargs)


@register_model
def dpvt_medium(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_medium", "medium", pretrained, kwargs)


@register_model
def dpvt_tiny_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def dpvt_small_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_small_dge", "small", pretrained, kwargs)


@register_model
def dpvt_medium_dge(pretrained: bool = False, **kwargs) -> PyramidVisionTransformer:
    return _pvt("dpvt_medium_dge", "medium", pretrained, kwargs)
