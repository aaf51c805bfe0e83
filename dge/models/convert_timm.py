"""Any timm model's checkpoint onto that model, patched by ``dge.patch`` or not: the model
module's own ``checkpoint_filter_fn`` first (the authors' layouts), then the DGE names
(``dge.layers.map_dge_keys``); ``dge.models.convert`` holds the shared steps."""
import copy
import sys
from typing import Mapping

import torch
from torch import nn

from dge.adapters import is_patched, unpatch
from dge.layers import is_dge_state, map_dge_keys

from .convert import Conversion, _check_shapes, _list_keys, unwrap_checkpoint

__all__ = ["convert_timm_state_dict"]

_NOT_IN_TIMM_MODEL = "not in the model: a stage past its outputs, its final norm, or a buffer it builds itself"


def convert_timm_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """A checkpoint of a timm model's architecture (timm's file or the authors' release: Swin,
    PVT v2, Hiera, SAM 2's Hiera ...) onto ``model``, that timm model patched by ``dge.patch``
    or not, maybe pruned to its detection outputs: the model module's own
    ``checkpoint_filter_fn`` (official layouts renamed, Swin's tables resized to its windows)
    against ``model`` unpatched, then the DGE names. Keys the model lacks (classifier, pruned
    stages, final norm) are dropped with the reason; routers stay initial."""
    state_dict = unwrap_checkpoint(state_dict)
    reference = unpatch(copy.deepcopy(model)) if is_patched(model) else model
    module = sys.modules[type(reference).__module__]
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    try:
        filtered = filter_fn(state_dict, reference) if filter_fn else dict(state_dict)
    except (AttributeError, KeyError) as e:
        raise ValueError(f"{module.__name__}.checkpoint_filter_fn cannot map this checkpoint onto "
                         f"{type(reference).__name__} ({type(e).__name__}: {e})") from None
    source = f"timm {type(reference).__name__}" + (f" ({module.__name__}.checkpoint_filter_fn)" if filter_fn else "")
    conversion = Conversion({}, source)
    out, target = map_dge_keys(filtered, model), model.state_dict()
    for key in [k for k in out if k not in target]:
        if not is_dge_state(key):  # (a budget table of a router the model lacks: its gate is reported)
            conversion.dropped[key] = "classifier" if key.startswith("head") else _NOT_IN_TIMM_MODEL
        del out[key]
    _check_shapes(out, target, conversion)
    _list_keys(out, target, conversion)
    conversion.state_dict = out
    return conversion
