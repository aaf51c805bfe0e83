"""DeiT (ViT with a class token, patch 16, global attention), with or without DGE.

A DeiT is a one-stage pyramid: the patch embedding (no norm), class token, position
embedding and blocks of a ``PyramidStage`` with global attention (``sr_ratio=1``), then a
final norm and the head. Its parameter names are timm's DeiT names except that the fused
``attn.qkv`` is stored as ``attn.q`` and ``attn.kv`` (as vtpack's DGE models);
``checkpoint_filter_fn`` converts timm / official DeiT and vtpack checkpoints.

timm names: ``deit_tiny_patch16_256`` / ``deit_small_patch16_256`` (vanilla; the paper's
256×256 input, timm itself only has ``_224`` / ``_384``) and ``deit_tiny_dge`` /
``deit_small_dge``.
"""
import re
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .pvt import (
    _PVT_STAGE_KEY,
    Conversion,
    PyramidStage,
    check_input_size,
    dge_options,
    finish_conversion,
    init_transformer_weights,
    unwrap_checkpoint,
)

__all__ = ["DeiT", "DEIT_SIZES", "checkpoint_filter_fn", "convert_deit_state_dict"]

# (embed_dim, num_heads) per size; depth 12, MLP ratio 4, patch 16.
DEIT_SIZES = {"tiny": (192, 3), "small": (384, 6)}


class DeiT(PyramidStage):
    """DeiT-Ti / DeiT-S.

    Args:
        img_size: input size the position embedding is stored for (256 in the paper).
        global_pool: "token" (the class token) or "avg" (mean of the spatial tokens).
        dge: None / False, True or a mapping of DynamicGrainedEncoder options; the class
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
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        dge: Union[None, bool, Mapping] = None,
    ):
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be one of ('token', 'avg'); got {global_pool!r}")
        img_size = to_2tuple(img_size)
        super().__init__(
            in_chans,
            embed_dim,
            depth,
            patch_size,
            (img_size[0] // patch_size, img_size[1] // patch_size),
            num_heads,
            mlp_ratio,
            attention="sr",
            sr_ratio=1,
            qkv_bias=qkv_bias,
            num_extra_tokens=1,
            patch_norm=False,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path=torch.linspace(0, drop_path_rate, depth).tolist(),
            norm_eps=norm_eps,
            dge=dge_options(dge),
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_transformer_weights(self)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be one of ('token', 'avg'); got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] -> normalised tokens [B, 1 + (H/16)*(W/16), C]."""
        check_input_size(tuple(x.shape[-2:]), self.patch_size, type(self).__name__)
        tokens, _ = super().forward(x)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, 1:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def convert_deit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: DeiT, fill_routers: bool = False
) -> Conversion:
    """Map a timm / official DeiT (``blocks.N.attn.qkv``), vtpack DeiT+DGE
    (``blocks.N.attn.q``/``kv``, ``blocks.N.dge.router.gate``, ``blocks.N.dge.splits``) or this
    project's checkpoint onto ``model``'s names; position embeddings are resampled to the
    model's grid. Raises ValueError for another architecture, depth or width."""
    state_dict = unwrap_checkpoint(state_dict)
    keys = list(state_dict)
    if any(k.startswith("stages.") or _PVT_STAGE_KEY.match(k) for k in keys):
        raise ValueError(
            "this is a PVT / DPVT checkpoint (keys 'patch_embed1.*' / 'stages.*'); a DeiT model needs a "
            "timm / official DeiT or vtpack DeiT checkpoint ('patch_embed.proj.*', 'blocks.N.*')"
        )
    if "patch_embed.proj.weight" not in state_dict or not any(k.startswith("blocks.") for k in keys):
        raise ValueError(
            f"unrecognised checkpoint layout (first keys: {keys[:4]}); a DeiT model needs a timm / official "
            "DeiT or vtpack DeiT checkpoint ('patch_embed.proj.*', 'blocks.N.*')"
        )
    if "dist_token" in state_dict:
        raise ValueError("distilled DeiT checkpoints (with 'dist_token') are not supported; use a non-distilled one")
    depth = 1 + max(int(m.group(1)) for m in (re.match(r"^blocks\.(\d+)\.", k) for k in keys) if m)
    if depth != len(model.blocks):
        raise ValueError(f"the checkpoint has {depth} blocks; the model has {len(model.blocks)}")
    fused = any(".attn.qkv." in k for k in keys)
    has_dge = any(".dge." in k for k in keys)
    source = "timm / official DeiT" if fused else ("vtpack DeiT+DGE" if has_dge else "DeiT with split q / kv")
    conversion = Conversion({}, source)
    target_keys = set(model.state_dict())
    converted: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if m:
            prefix, rest = f"blocks.{m.group(1)}", m.group(2)
            if rest.startswith("attn.qkv."):
                c = value.shape[0] // 3  # rows: q, then k, then v
                param = rest[len("attn.qkv."):]
                converted[f"{prefix}.attn.q.{param}"] = value[:c]
                converted[f"{prefix}.attn.kv.{param}"] = value[c:]
            else:
                converted[f"{prefix}.{rest.replace('dge.router.', 'router.').replace('dge.splits', 'splits')}"] = value
        elif key.startswith(("norm.", "head.")) and key not in target_keys:
            conversion.dropped[key] = "classification norm / head; not part of this model"
        else:
            converted[key] = value  # cls_token, pos_embed, patch_embed.*, norm.*, head.*; others are unexpected
    return finish_conversion(converted, model, conversion, fill_routers)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: DeiT) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn``: timm / official / vtpack DeiT keys -> this model's, logged;
    missing routers take the model's initial values (timm loads strictly)."""
    conversion = convert_deit_state_dict(state_dict, model, fill_routers=True)
    conversion.log()
    return conversion.state_dict


def _create_deit(variant: str, size: str, pretrained: bool, kwargs: Dict) -> DeiT:
    dim, heads = DEIT_SIZES[size]
    args = dict(embed_dim=dim, num_heads=heads, dge=variant.endswith("_dge"))
    return build_model_with_cfg(
        DeiT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **dict(args, **kwargs)
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
        for name in ("deit_tiny_patch16_256", "deit_small_patch16_256", "deit_tiny_dge", "deit_small_dge")
    }
)


@register_model
def deit_tiny_patch16_256(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_tiny_patch16_256", "tiny", pretrained, kwargs)


@register_model
def deit_small_patch16_256(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_small_patch16_256", "small", pretrained, kwargs)


@register_model
def deit_tiny_dge(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_tiny_dge", "tiny", pretrained, kwargs)


@register_model
def deit_small_dge(pretrained: bool = False, **kwargs) -> DeiT:
    return _create_deit("deit_small_dge", "small", pretrained, kwargs)
