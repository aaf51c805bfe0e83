"""Optimizer of the paper's recipes: AdamW without weight decay on norms, position
embeddings, class tokens and router biases (everything else decays)."""
from typing import Dict, List, Tuple

import torch
from detectron2.solver.build import maybe_add_gradient_clipping
from torch import nn

__all__ = ["no_weight_decay_params", "build_optimizer"]

OPTIMIZERS = ("AdamW", "SGD")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.modules.batchnorm._BatchNorm)


def no_weight_decay_params(model: nn.Module) -> set:
    """Names of the parameters that must not decay."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        for name, _ in module.named_parameters(recurse=False):
            full = prefix + name
            if isinstance(module, _NORMS) or "norm" in type(module).__name__.lower():
                names.add(full)
            elif name in ("pos_embed", "cls_token") or name.startswith("pos_embed"):
                names.add(full)
            elif ".router." in f".{full}" and name == "bias":
                names.add(full)
    return names


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER (AdamW or SGD) over parameter groups with and without weight decay,
    the routers' at BASE_LR × MODEL.DGE.ROUTER_LR_FACTOR, and detectron2's gradient clipping
    (SOLVER.CLIP_GRADIENTS). detectron2's schedulers scale every group's lr alike."""
    kind = cfg.SOLVER.OPTIMIZER
    if kind not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}; got {kind!r}")
    skip = no_weight_decay_params(model)
    router_lr = cfg.SOLVER.BASE_LR * cfg.MODEL.DGE.ROUTER_LR_FACTOR
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name not in skip, ".router." in f".{name}"), []).append(p)
    params = [
        {
            "params": ps,
            "weight_decay": cfg.SOLVER.WEIGHT_DECAY if decay else 0.0,
            "lr": router_lr if router else cfg.SOLVER.BASE_LR,
        }
        for (decay, router), ps in sorted(groups.items())
    ]
    if kind == "AdamW":
        opt_cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return opt_cls(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
    opt_cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return opt_cls(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)
