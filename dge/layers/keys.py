"""The one mapping between a DGE model's and its vanilla twin's state-dict keys.

A Dynamic Grained Encoder stores the block it wraps under ``block.`` and its router under
``router.``; the vanilla block stores the same parameters without ``block.``. Both modules
call ``map_block_keys`` when they load, so either checkpoint loads into either model (a DGE
file's routers are then unused, and reported so by ``load_state_dict``), and checkpoint
conversion (``dge.models.convert``) applies it to a whole model with
``map_dge_keys``; ``vanilla_state_dict`` names a DGE model's tensors for its vanilla twin."""
from typing import Dict, MutableMapping

import torch
from torch import nn

__all__ = [
    "DGE_OWN_KEYS", "OPTIONS_STATE", "ROUTER_STATE", "is_dge_state", "map_block_keys", "map_dge_keys",
    "vanilla_state_dict",
]

OPTIONS_STATE = "_extra_state"  # torch's key of a module's get_extra_state(): a DGE block's options
# What a DGE wrapper stores beside its block: the router, its options, and vtpack's split sizes
# (conversion only).
DGE_OWN_KEYS = ("router.", OPTIONS_STATE, "splits")
# A router's own state, not weights: its table of inference budgets (empty unless calibrated).
ROUTER_STATE = ("router.budget_targets", "router.budget_offsets")


def is_dge_state(key: str) -> bool:
    """Whether ``key`` is DGE state, not weights: a router's budget table or a DGE block's
    options (``_extra_state``). No checkpoint of other code has them; a model loading a file
    without them keeps its own."""
    return key.endswith(ROUTER_STATE) or key.rpartition(".")[2] == OPTIONS_STATE


def map_block_keys(state_dict: MutableMapping[str, torch.Tensor], prefix: str, wrapped: bool) -> None:
    """In place: the keys under ``prefix`` renamed for a DGE wrapper there (``wrapped``: the
    block's keys gain ``block.``) or for a vanilla block there (``block.`` removed; router
    keys stay, to be reported as unused)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if wrapped and not rest.startswith(("block.",) + DGE_OWN_KEYS):
            state_dict[prefix + "block." + rest] = state_dict.pop(key)
        elif not wrapped and rest.startswith("block."):
            state_dict[prefix + rest[len("block."):]] = state_dict.pop(key)


def map_dge_keys(state_dict: MutableMapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every block's keys named as ``model`` names them (what
    loading into ``model`` does on the way, for code that compares keys before it loads).
    Modules that load through ``map_block_keys`` say how in ``block_keys``: ``"wrapped"`` (a
    DGE wrapper) or ``"vanilla"`` (a vanilla block)."""
    out = dict(state_dict)
    wrappers = set()
    for name, m in model.named_modules():
        kind = getattr(m, "block_keys", None)
        if kind == "wrapped":
            wrappers.add(name)
            map_block_keys(out, name + ".", wrapped=True)
        elif kind == "vanilla" and name.rpartition(".")[0] not in wrappers:
            map_block_keys(out, name + ".", wrapped=False)
    return out


def vanilla_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s state dict named as its vanilla twin names it: ``block.`` removed under
    every DGE wrapper (router keys stay, to be reported as unused), also where the vanilla
    block has no key mapping of its own (timm's blocks)."""
    state = model.state_dict()
    for name, m in model.named_modules():
        if getattr(m, "block_keys", None) == "wrapped":
            map_block_keys(state, name + ".", wrapped=False)
    return state
