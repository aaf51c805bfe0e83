"""``dge.patch`` / ``dge.unpatch``: Dynamic Grained Encoders on a model you already have, in
place, as ToMe's ``tome.patch.timm`` does.

``patch`` walks the model's stages (``model_stages``: one token grid per stage), finds each
block's adapter by its type (``dge.adapters.base.find_adapter``), checks every block, and only
then wraps them all: a model it refuses is left as it was. A stage whose blocks are called
without their map size (timm's ``blk(x)``) gets its patch embedding to record the grid
(``dge.adapters.grid``). Keys: a patched block keeps the block's modules under ``block.`` and
adds ``router.``; the unpatched model's state dict loads into the patched one
(``dge.layers.map_block_keys``), the routers being the only missing keys. Prefix tokens (class
token, registers) are the DGE block's extra tokens, always queries.
"""
import logging
import math
from typing import Any, Callable, List, Mapping, Optional, Tuple, Type, Union

from torch import nn

from dge.layers import DGEOptions, DynamicGrainedEncoder

from .base import Adapter, Stage, find_adapter
from .grid import record_grid, stop_recording

__all__ = ["STAGE_FINDERS", "fit_to_windows", "is_patched", "model_stages", "patch", "register_stages", "unpatch"]

logger = logging.getLogger(__name__)

STAGE_FINDERS: List[Callable[[nn.Module], Optional[List[Stage]]]] = []  # tried in order


def register_stages(finder: Callable[[nn.Module], Optional[List[Stage]]]) -> Callable:
    """Adds ``finder(model) -> [Stage] or None`` (None: not a model it knows) to the walk."""
    STAGE_FINDERS.append(finder)
    return finder


def _is_block_list(blocks) -> bool:
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0


@register_stages
def _single_stage(model: nn.Module) -> Optional[List[Stage]]:
    """A plain ViT: ``model.blocks`` on one grid; timm's patch embedding records it."""
    if not _is_block_list(getattr(model, "blocks", None)):
        return None
    embed = getattr(model, "patch_embed", None)
    extra = getattr(model, "num_prefix_tokens", getattr(model, "num_extra_tokens", 0))
    recorder = embed if hasattr(embed, "dynamic_feat_size") else None
    return [Stage(model.blocks, extra, recorder, model)]


@register_stages
def _hierarchical(model: nn.Module) -> Optional[List[Stage]]:
    """A pyramid: ``model.stages`` (or ``model.layers``), each with its ``blocks`` on its own grid."""
    stages = getattr(model, "stages", getattr(model, "layers", None))
    if not isinstance(stages, (nn.Sequential, nn.ModuleList)) or not stages:
        return None
    if not all(_is_block_list(getattr(s, "blocks", None)) for s in stages):
        return None
    return [Stage(s.blocks, getattr(s, "num_extra_tokens", 0), None, model) for s in stages]


@register_stages
def _feature_wrapper(model: nn.Module) -> Optional[List[Stage]]:
    """timm's ``features_only`` models: ``FeatureGetterNet`` keeps the model as ``.model``;
    ``FeatureListNet`` re-registers its stages as children (``layers_0``, ``stages_1``, ...)."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and not hasattr(model, "blocks"):
        return model_stages(inner)
    children = [c for c in model.children() if _is_block_list(getattr(c, "blocks", None))]
    return [Stage(c.blocks, getattr(c, "num_extra_tokens", 0), None, model) for c in children] or None


def model_stages(model: nn.Module) -> List[Stage]:
    """The stages ``patch`` wraps, from the first finder that knows ``model``."""
    for finder in STAGE_FINDERS:
        stages = finder(model)
        if stages:
            return stages
    raise TypeError(
        f"dge.patch takes a vision transformer with its blocks in model.blocks (timm's VisionTransformer, "
        f"Eva, VisionTransformerSAM, Hiera) or in model.stages[i].blocks / model.layers[i].blocks (Swin, "
        f"PVT v2); got {type(model).__name__}"
    )


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, "_dge_stages")


BlockOptions = Callable[[str, Optional[Tuple[int, int]]], Optional[DGEOptions]]
Options = Union[None, Mapping[str, Any], DGEOptions, BlockOptions]


def fit_to_windows(options: Union[None, Mapping[str, Any], DGEOptions] = None) -> BlockOptions:
    """Options per block for ``patch``: ``options`` where its region size tiles a block's window;
    else the largest region size below it that does, with the granularities of Φ that divide
    it (SAM 2's windows of 14 take Φ = {1, 2} of {1, 2, 4}). A block left with one positive
    granularity (windows of 7 under {1, 2, 4}) is kept dense."""
    base = DGEOptions.coerce(options) or DGEOptions()
    region = base.region_size or max(base.granularities)

    def per_block(label: str, window: Optional[Tuple[int, int]]) -> Optional[DGEOptions]:
        if window is None:
            return base
        size = math.gcd(*window)
        fit = max(s for s in range(1, region + 1) if size % s == 0)
        phi = tuple(g for g in base.granularities if g == 0 or fit % g == 0)
        if sum(g > 0 for g in phi) < 2:
            return None
        return base if fit == region else base.replace(granularities=phi, region_size=fit)

    return per_block


def _plan(stages: List[Stage], options: Options) -> List[Tuple[Stage, int, Type[Adapter], DGEOptions]]:
    """(stage, index, adapter, options) of every block to wrap, each checked: nothing is changed
    yet. Blocks their adapter keeps dense, or whose options are None, are left out."""
    plan = []
    for s, stage in enumerate(stages):
        for i, block in enumerate(stage.blocks):
            label = f"block {i}" if len(stages) == 1 else f"stage {s} block {i}"
            adapter = find_adapter(block, label)
            if adapter.dense(block):
                continue
            block_options = options(label, adapter.window(block)) if callable(options) else options
            if block_options is not None:
                adapter.check(block, label, stage, block_options)
                plan.append((stage, i, adapter, block_options))
    return plan


def patch(model: nn.Module, options: Options = None) -> nn.Module:
    """Wraps, in place, every block of ``model`` in a ``DynamicGrainedEncoder`` and returns
    ``model``. ``options``: a ``DGEOptions``, a mapping of its fields, None for the defaults, or
    ``fn(block label, its window or None) -> DGEOptions or None`` (None: the block stays dense;
    ``fit_to_windows``). The routers are the only new tensors (logged). All or nothing: a
    block it cannot wrap stops it before any block is changed."""
    if is_patched(model):
        raise ValueError(f"{type(model).__name__} is already patched; dge.unpatch(model) first")
    if not callable(options):
        options = DGEOptions.coerce(options) or DGEOptions()
    stages = model_stages(model)
    plan = _plan(stages, options)
    wrapped = []
    for stage, i, adapter, block_options in plan:
        block = stage.blocks[i]
        inner = adapter.wrap(block, stage)
        weight = next(block.parameters())
        layer = DynamicGrainedEncoder(inner, inner.dim, block_options, stage.num_extra)
        wrapped.append(layer.to(device=weight.device, dtype=weight.dtype).train(block.training))
    for (stage, i, adapter, _), layer in zip(plan, wrapped):
        stage.blocks[i] = layer
        stage.wrapped.append((i, adapter))
    for stage in stages:
        if stage.recorder is not None:
            record_grid(stage.recorder, stage.grid)
    model._dge_stages = stages
    new = sum(p.numel() for b in wrapped if b.router is not None for p in b.router.parameters())
    dense = sum(len(stage.blocks) for stage in stages) - len(wrapped)
    logger.info("dge.patch: %d blocks of %s wrapped%s; new tensors: *.router.* (%d parameters)", len(wrapped),
                type(model).__name__, f" ({dense} kept dense)" if dense else "", new)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undoes ``patch``: the original blocks (which share every tensor the patched model
    trained) and patch embedding classes; the routers are dropped. Returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"{type(model).__name__} is not patched by dge.patch")
    for stage in model._dge_stages:
        for i, adapter in stage.wrapped:
            stage.blocks[i] = adapter.unwrap(stage.blocks[i].block)
        if stage.recorder is not None:
            stop_recording(stage.recorder)
    del model._dge_stages
    return model
