"""Parts the PVT / DPVT pyramid (``pvt.py``) and DeiT (``deit.py``) share: the patch
embedding, position embeddings resampled to the input's grid, the blocks (vanilla or wrapped
by a Dynamic Grained Encoder, attention from ``dge.layers.create_attention``), input-size
checks, the official initialisation and timm's classifier / feature API."""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import trunc_normal_
from timm.models import register_notrace_function
from timm.models._features import feature_take_indices
from torch import nn
from torch.nn import functional as F

from dge.layers import (
    NORM_EPS,
    QKV_BIAS,
    DeformableAttention,
    DGEOptions,
    DynamicGrainedEncoder,
    EncoderBlock,
    GrainedRouter,
    create_attention,
)

__all__ = [
    "PatchEmbed",
    "build_blocks",
    "check_input_size",
    "padded_size",
    "embed_tokens",
    "init_transformer_weights",
    "TokenModel",
    "resample_pos_embed",
    "tokens_to_map",
]


def build_blocks(
    dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    attention: str = "sr",
    sr_ratio: int = 1,
    num_points: int = 4,
    qkv_bias: bool = QKV_BIAS,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path: Sequence[float] = (),
    norm_eps: float = NORM_EPS,
    num_extra_tokens: int = 0,
    dge: Optional[DGEOptions] = None,
) -> nn.ModuleList:
    """``depth`` encoder blocks with ``attention`` (a kind of ``dge.layers.ATTENTION_KINDS``), each
    wrapped by a ``DynamicGrainedEncoder`` when ``dge`` is given."""
    drop_path = list(drop_path) or [0.0] * depth
    blocks = []
    for j in range(depth):
        attn = create_attention(
            attention, dim, num_heads, sr_ratio=sr_ratio, num_points=num_points, qkv_bias=qkv_bias,
            attn_drop=attn_drop_rate, proj_drop=drop_rate,
        )
        block = EncoderBlock(dim, attn, mlp_ratio, drop=drop_rate, drop_path=drop_path[j], norm_eps=norm_eps)
        if dge is not None:
            block = DynamicGrainedEncoder(block, dim, dge, num_extra_tokens=num_extra_tokens)
        blocks.append(block)
    return nn.ModuleList(blocks)


@register_notrace_function
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


def embed_tokens(
    x: torch.Tensor,
    patch_embed: nn.Module,
    pos_embed: torch.Tensor,
    pos_grid: Tuple[int, int],
    cls_token: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """x: [B, C_in, H, W] -> (tokens [B, E + h*w, C] with position embeddings added, (h, w));
    E = 1 with a class token, prepended."""
    tokens, hw = patch_embed(x)
    e = 0 if cls_token is None else 1  # cls_token: [1, 1, C]
    if e:
        tokens = torch.cat([cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return tokens + resample_pos_embed(pos_embed, pos_grid, hw, e), hw


def padded_size(hw: Tuple[int, int], size_divisibility: int) -> Tuple[int, int]:
    """(H, W) rounded up to multiples of ``size_divisibility`` (detectron2's ImageList
    padding; 0 or 1: unchanged): the size a backbone sees for an image of ``hw``."""
    d = max(int(size_divisibility), 1)
    return -(-hw[0] // d) * d, -(-hw[1] // d) * d


def check_input_size(x: torch.Tensor, min_size: int, what: str) -> None:
    """An input [.., H, W] smaller than ``min_size`` pixels on a side stops with a message (in
    an FX graph, an assertion)."""
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(h, torch.fx.Proxy):
        torch._assert((h >= min_size) & (w >= min_size), f"{what} needs inputs of at least {min_size} pixels a side")
    elif h < min_size or w < min_size:
        raise ValueError(
            f"{what} needs inputs of at least {min_size}×{min_size} pixels (the total stride of its "
            f"patch embeddings); got {h}×{w}"
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
        is converted): faster than NCHW on CPUs, what cuDNN wants in half precision, and its
        output flattens to contiguous tokens without a transpose copy."""
        x = self.proj(x.contiguous(memory_format=torch.channels_last))
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw


def tokens_to_map(tokens: torch.Tensor, hw: Tuple[int, int], num_extra: int = 0) -> torch.Tensor:
    """[B, E + h*w, C] -> [B, C, h, w] (the spatial tokens) as a channels-last view: no copy.
    Call ``.contiguous()`` for an NCHW-contiguous map."""
    return tokens[:, num_extra:].reshape(tokens.shape[0], hw[0], hw[1], tokens.shape[-1]).permute(0, 3, 1, 2)


class TokenModel(nn.Module):
    """timm's classifier and feature API for a token model whose ``model.<feature_layers>``
    (a ModuleList: DeiT's blocks, the pyramid's stages) give its features. A subclass sets
    ``num_features``, ``norm``, ``head_drop`` and defines ``forward_features``,
    ``forward_head`` and ``_intermediates``."""

    feature_layers = "blocks"
    pruned_pool: Optional[str] = None  # the global_pool a pruned head is reset with

    def _set_head(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """The feature maps [B, C_i, H_i, W_i] of the layers ``indices`` picks, or (the final
        normalised tokens, the maps) unless ``intermediates_only``."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW'; got {output_fmt!r}")
        layers = getattr(self, self.feature_layers)
        take_indices, max_index = feature_take_indices(len(layers), indices)
        if stop_early or intermediates_only:
            layers = layers[: max_index + 1]
        tokens, maps = self._intermediates(x, layers, take_indices, norm)
        return maps if intermediates_only else (self.norm(tokens), maps)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the layers after the last one ``indices`` takes, and the final norm and the head if asked."""
        take_indices, max_index = feature_take_indices(len(getattr(self, self.feature_layers)), indices)
        setattr(self, self.feature_layers, getattr(self, self.feature_layers)[: max_index + 1])
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, self.pruned_pool)
        return take_indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
