"""Checkpoint conversion: official PVT v1, vtpack (PVT, PVT+DGE, DPVT, DeiT+DGE), timm /
official DeiT and this project's files onto this project's models, with a report of what was
dropped, resampled or left at initialisation. DGE and vanilla blocks' keys are mapped by
``dge.layers.map_dge_keys`` (the one mapping, used by loading too)."""
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional

import torch
from timm.layers import resample_patch_embed
from torch import nn

from dge.layers import DynamicGrainedEncoder, is_dge_state, map_dge_keys

from .parts import resample_pos_embed

__all__ = [
    "Conversion",
    "checkpoint_filter_fn",
    "convert_deit_state_dict",
    "convert_pvt_state_dict",
    "convert_vitdet_state_dict",
    "finish_conversion",
    "unwrap_checkpoint",
]

logger = logging.getLogger(__name__)


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
        initial: other model keys left at their initial values on purpose -> why.
    """

    state_dict: Dict[str, torch.Tensor]
    source: str
    dropped: Dict[str, str] = field(default_factory=dict)
    resampled: Dict[str, str] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    initial_routers: List[str] = field(default_factory=list)
    initial: Dict[str, str] = field(default_factory=dict)

    @property
    def unexplained_missing(self) -> List[str]:
        """Missing keys that are neither routers nor left initial on purpose."""
        return [k for k in self.missing if k not in self.initial_routers and k not in self.initial]

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
        for key, why in self.initial.items():
            log.info(f"left at its initial value: {key} ({why})")
        other_missing = self.unexplained_missing
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
    wrappers = {name: m for name, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)}
    target = model.state_dict()
    out, splits = _wrapped_keys(converted, model, wrappers, target, conversion)
    _order_router_rows(out, splits, wrappers, conversion)
    _fit_position_grids(out, model, target, conversion)
    _check_shapes(out, target, conversion)
    _list_keys(out, target, conversion)
    if fill_routers:  # timm loads strictly: every router tensor, budget tables too
        for k in conversion.initial_routers + [k for k in target if is_dge_state(k) and k not in out]:
            out[k] = target[k]
    conversion.state_dict = out
    return conversion


def _list_keys(out, target, conversion) -> None:
    """The model keys the converted tensors miss (routers among them), and the converted keys
    the model lacks. No other code has budget tables: the model's (empty) ones are neither
    missing nor written."""
    conversion.missing = [k for k in target if k not in out and not is_dge_state(k)]
    conversion.unexpected = [k for k in out if k not in target]
    conversion.initial_routers = [k for k in conversion.missing if ".router." in k]


def _wrapped_keys(converted, model, wrappers, target, conversion):
    """(tensors under the model's DGE wrapper names, vtpack split sizes per wrapper name)."""
    out: Dict[str, torch.Tensor] = {}
    splits: Dict[str, torch.Tensor] = {}
    for key, value in map_dge_keys(converted, model).items():
        if is_dge_state(key) and key not in target:
            continue  # a budget table of a router the model does not have: its gate is reported
        if ".router." in key and key.partition(".router.")[0] not in wrappers:
            conversion.dropped[key] = "DGE router; the model has no DGE block here"
        elif key.endswith(".splits"):
            splits[key[: -len(".splits")]] = value
        else:
            out[key] = value
    return out, splits


def _order_router_rows(out, splits, wrappers, conversion) -> None:
    """vtpack routers: row k of the gate belongs to the split size splits[k], i.e. the
    granularity S / splits[k]; rows are put in the model's ascending Φ."""
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


def _fit_position_grids(out, model, target, conversion) -> None:
    """Position embeddings on the model's grid (bilinear), a class-token position dropped
    where the model has no class token."""
    for key in [k for k in out if k.endswith("pos_embed") and k in target]:
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


def _check_shapes(out, target, conversion) -> None:
    """A classifier for other classes is dropped (said); any other shape mismatch stops."""
    for key in [k for k in out if k.startswith("head.")]:
        if key in target and out[key].shape != target[key].shape:
            classes = (out[key].shape[0], target[key].shape[0])
            conversion.dropped[key] = f"classifier for {classes[0]} classes; the model has {classes[1]}"
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


_PVT_STAGE_KEY = re.compile(r"^(patch_embed|pos_embed|block)(\d)(.*)$")
_PVT_BLOCK_KEY = re.compile(r"^\.(\d+)\.(.*)$")


def _model_stages(model: nn.Module) -> nn.ModuleList:
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList) or not all(hasattr(s, "attention_kind") for s in stages):
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
    if any(k.startswith("stages.") for k in state_dict):
        return finish_conversion(dict(state_dict), model, Conversion({}, "dge (this project)"), fill_routers)
    conversion = Conversion({}, _pvt_source(list(state_dict), stages))
    converted = _pvt_names(state_dict, stages, set(model.state_dict()), conversion)
    return finish_conversion(converted, model, conversion, fill_routers)


_PVT_LAYOUTS = (
    "an official PVT v1 or vtpack checkpoint ('patch_embed1.*', 'block1.0.*') or one of this project's ('stages.0.*')"
)
# vtpack's names inside a block -> this project's (the DGE wrapper's names come from map_dge_keys).
_VTPACK_NAMES = (("dge.router.", "router."), ("dge.splits", "splits"))
OFFICIAL_CLASS_TOKEN_STAGE = 3  # official PVT v1 adds its class token in the 4th (last) stage


def _vtpack_name(name: str) -> str:
    for old, new in _VTPACK_NAMES:
        name = name.replace(old, new)
    return name


def _pvt_source(keys: List[str], stages: nn.ModuleList) -> str:
    """The layout of an official PVT v1 / vtpack checkpoint ("vtpack DPVT+DGE" ...), checked
    against the model's attention kind and depths."""
    if not any(_PVT_STAGE_KEY.match(k) for k in keys):
        if any(k.startswith("blocks.") for k in keys) or "patch_embed.proj.weight" in keys:
            found = "this is a DeiT / ViT checkpoint (keys 'patch_embed.proj.*', 'blocks.N.*')"
        else:
            found = f"unrecognised checkpoint layout (first keys: {keys[:4]})"
        raise ValueError(f"{found}; a PVT / DPVT model needs {_PVT_LAYOUTS}")
    deformable = any(".attn.offsets." in k for k in keys)
    has_dge = any(".dge." in k for k in keys)
    source = ("vtpack DPVT" if deformable else "vtpack PVT") + ("+DGE" if has_dge else "")
    source = "official PVT v1" if source == "vtpack PVT" else source
    kind = "deformable" if deformable else "sr"
    if stages[0].attention_kind != kind:
        raise ValueError(
            f"the checkpoint is a {source} checkpoint ({kind!r} attention); "
            f"the model uses {stages[0].attention_kind!r} attention"
        )
    depths: Dict[int, int] = {}
    for m in filter(None, (re.match(r"^block(\d)\.(\d+)\.", k) for k in keys)):
        s = int(m.group(1)) - 1
        depths[s] = max(depths.get(s, 0), int(m.group(2)) + 1)
    model_depths = [len(s.blocks) for s in stages]
    common = range(min(len(model_depths), max(depths, default=-1) + 1))
    if [depths.get(s, 0) for s in common] != [model_depths[s] for s in common]:
        found = tuple(depths[s] for s in sorted(depths))
        raise ValueError(f"the checkpoint has block depths {found}; the model has {tuple(model_depths)}")
    return source


def _pvt_names(state_dict, stages: nn.ModuleList, target_keys, conversion: Conversion) -> Dict[str, torch.Tensor]:
    """Official / vtpack keys in this project's names (``block2.1.*`` -> ``stages.1.blocks.1.*``);
    what the model has no place for goes to ``conversion.dropped``."""
    converted: Dict[str, torch.Tensor] = {}
    last = len(stages) - 1
    for key, value in state_dict.items():
        m = _PVT_STAGE_KEY.match(key)
        if m:
            what, s, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
            if s > last:
                conversion.dropped[key] = f"stage {s + 1} is not part of this model"
            elif what == "block":
                b = _PVT_BLOCK_KEY.match(rest)
                converted[f"stages.{s}.blocks.{b.group(1)}.{_vtpack_name(b.group(2))}"] = value
            else:
                converted[f"stages.{s}.{what}{rest}"] = value
        elif key == "cls_token":
            if last == OFFICIAL_CLASS_TOKEN_STAGE and stages[last].num_extra_tokens:
                converted[f"stages.{last}.cls_token"] = value
            else:
                conversion.dropped[key] = "class token; the model has none (pooling 'avg' or a detection backbone)"
        elif key.startswith(("norm.", "head.")) and key not in target_keys:
            conversion.dropped[key] = "classification norm / head; not part of this model"
        else:
            converted[key] = value  # norm / head of the model; unknown keys are reported as unexpected
    return converted


def convert_deit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, fill_routers: bool = False
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
                converted[f"{prefix}.{_vtpack_name(rest)}"] = value
        elif key.startswith(("norm.", "head.")) and key not in target_keys:
            conversion.dropped[key] = "classification norm / head; not part of this model"
        else:
            converted[key] = value  # cls_token, pos_embed, patch_embed.*, norm.*, head.*; others are unexpected
    return finish_conversion(converted, model, conversion, fill_routers)


_VITDET_DROPPED = {  # checkpoint keys (prefixes) ViTDet's plain backbone has no use for
    "cls_token": "class token; ViTDet's backbone has none",
    "reg_token": "register tokens; ViTDet's backbone has none",
    "mask_token": "MAE / DINOv2 mask token; not used by a detector",
    "norm.": "final norm; the simple feature pyramid reads the last block",
    "fc_norm.": "pooled norm of the classifier",
    "head.": "classifier",
}


def convert_vitdet_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """A timm ViT checkpoint (MAE, DeiT III, DINOv2 with registers: ``blocks.N.*``,
    ``pos_embed`` after its prefix tokens) onto ViTDet's plain ViT (timm's
    ``VisionTransformerSAM``, ``vitdet.vit_from_config``), DGE blocks included: the blocks
    as they are, the patch embedding resized to the model's patch size (FlexiViT's
    resampling), the position grid without prefix tokens resampled to the model's;
    relative-position tables (ViTDet starts them at zero) and routers stay initial."""
    state_dict = unwrap_checkpoint(state_dict)
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError(f"a ViTDet backbone needs a timm ViT checkpoint (patch_embed.proj, pos_embed, blocks.N); "
                         f"got keys {list(state_dict)[:4]}")
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    if depth != len(model.blocks):
        raise ValueError(f"the checkpoint has {depth} blocks; the model has {len(model.blocks)}")
    conversion = Conversion({}, "timm ViT (MAE / DeiT III / DINOv2)")
    converted: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        why = next((w for prefix, w in _VITDET_DROPPED.items() if key.startswith(prefix)), None)
        if why:
            conversion.dropped[key] = why
        elif key == "patch_embed.proj.weight":
            converted[key] = _fit_patch_size(value, model, conversion)
        elif key == "pos_embed":
            converted[key] = _fit_map_grid(value, model, conversion)
        else:
            converted[key] = value
    out, target = map_dge_keys(converted, model), model.state_dict()
    _check_shapes(out, target, conversion)
    _list_keys(out, target, conversion)
    conversion.initial = {k: "relative positions; ViTDet starts them at zero" for k in conversion.missing
                          if k.endswith(("rel_pos_h", "rel_pos_w"))}
    conversion.state_dict = out
    return conversion


def _fit_patch_size(weight: torch.Tensor, model: nn.Module, conversion: Conversion) -> torch.Tensor:
    size = list(model.patch_embed.proj.weight.shape[-2:])
    if list(weight.shape[-2:]) == size:
        return weight
    conversion.resampled["patch_embed.proj.weight"] = f"{weight.shape[-2]}×{weight.shape[-1]} -> {size[0]}×{size[1]}"
    return resample_patch_embed(weight, size)


def _fit_map_grid(pos_embed: torch.Tensor, model: nn.Module, conversion: Conversion) -> torch.Tensor:
    """[1, P + s*s, C] (P prefix positions, the fewest that leave a square) -> the model's
    [1, H, W, C] grid."""
    n, grid = pos_embed.shape[1], tuple(model.pos_embed.shape[1:3])
    prefix = next((p for p in range(9) if _square_grid(n - p)), None)
    if prefix is None:
        raise ValueError(f"pos_embed: no square position grid among {n} positions")
    side = _square_grid(n - prefix)
    if prefix:
        conversion.dropped[f"pos_embed[:{prefix}]"] = "prefix-token positions; ViTDet's backbone has no prefix tokens"
    if (side, side) != grid:
        conversion.resampled["pos_embed"] = f"{side}×{side} -> {grid[0]}×{grid[1]}"
    spatial = resample_pos_embed(pos_embed[:, prefix:], (side, side), grid)
    return spatial.reshape(1, grid[0], grid[1], -1)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for every model here: the checkpoint converted for a
    pyramid (PVT / DPVT, anything with ``stages``) or a DeiT, logged; missing routers take
    the model's initial values (timm loads strictly)."""
    convert = convert_pvt_state_dict if hasattr(model, "stages") else convert_deit_state_dict
    conversion = convert(state_dict, model, fill_routers=True)
    conversion.log()
    return conversion.state_dict
