"""Optimizers and LR schedules of the paper's recipes, for both trainers: the parameter
groups (no weight decay on norms, position embeddings, class tokens and router biases; the
classifier's recipe also spares every other 1-D parameter; the routers' own learning rate),
detectron2's optimizer for SOLVER.* and the warm-up + poly schedule of the segmentation recipe."""
from typing import Dict, List, Tuple

import torch
from detectron2.solver import LRMultiplier, WarmupParamScheduler
from detectron2.solver import build_lr_scheduler as d2_build_lr_scheduler
from detectron2.solver.build import maybe_add_gradient_clipping
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from torch import nn

__all__ = ["no_weight_decay_params", "param_groups", "build_optimizer", "build_lr_scheduler"]

OPTIMIZERS = ("AdamW", "SGD")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.modules.batchnorm._BatchNorm)


def no_weight_decay_params(model: nn.Module) -> set:
    """Names of the parameters that must not decay: norms, position embeddings, class tokens,
    router biases, and what a timm model's ``no_weight_decay()`` names (Swin's relative
    position tables, Swin v2's position MLP and logit scales)."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = module_name + "." if module_name else ""
        if callable(getattr(module, "no_weight_decay", None)):
            names |= {prefix + n for n in module.no_weight_decay()}
        for name, _ in module.named_parameters(recurse=False):
            full = prefix + name
            if isinstance(module, _NORMS) or "norm" in type(module).__name__.lower():
                names.add(full)
            elif name in ("pos_embed", "cls_token") or name.startswith("pos_embed"):
                names.add(full)
            elif ".router." in f".{full}" and name == "bias":
                names.add(full)
    return names


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, router_lr_factor: float = 1.0, decay_1d: bool = True
) -> List[Dict]:
    """The optimizer's parameter groups: weight decay except on ``no_weight_decay_params``
    (and, with ``decay_1d=False``, on any 1-D parameter: biases too, timm's / DeiT's rule), the
    routers at ``lr × router_lr_factor``. Frozen parameters are left out."""
    skip = no_weight_decay_params(model)
    groups: Dict[Tuple[bool, bool], List[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = name not in skip and (decay_1d or p.ndim > 1)
            groups.setdefault((decay, ".router." in f".{name}"), []).append(p)
    return [
        {"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * router_lr_factor if router else lr}
        for (decay, router), ps in sorted(groups.items())
    ]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER (AdamW or SGD) over parameter groups with and without weight decay,
    the routers' at BASE_LR × MODEL.DGE.ROUTER_LR_FACTOR, and detectron2's gradient clipping
    (SOLVER.CLIP_GRADIENTS). detectron2's schedulers scale every group's lr alike."""
    kind = cfg.SOLVER.OPTIMIZER
    if kind not in OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {OPTIMIZERS}; got {kind!r}")
    params = param_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.MODEL.DGE.ROUTER_LR_FACTOR)
    if kind == "AdamW":
        opt_cls = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return opt_cls(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
    opt_cls = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
    return opt_cls(params, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV)


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """detectron2's schedulers, and "WarmupPolyLR": BASE_LR·(1 − t / MAX_ITER)^POLY_LR_POWER after
    the usual warm-up, down to 0 (mmsegmentation's "poly", the segmentation recipe). The
    checkpoint keeps only the iteration: a resumed run follows the schedule of its own config."""
    name, power = cfg.SOLVER.LR_SCHEDULER_NAME, cfg.SOLVER.POLY_LR_POWER
    if name != "WarmupPolyLR":
        try:
            return d2_build_lr_scheduler(cfg, optimizer)
        except ValueError as e:
            if "Unknown LR scheduler" not in str(e):
                raise
            raise ValueError(
                "SOLVER.LR_SCHEDULER_NAME must be WarmupPolyLR or one of detectron2's "
                f"(WarmupMultiStepLR, WarmupCosineLR, ...); got {name!r}"
            ) from None
    if power <= 0:
        raise ValueError(f"SOLVER.POLY_LR_POWER must be > 0; got {power}")
    warmup = min(cfg.SOLVER.WARMUP_ITERS / cfg.SOLVER.MAX_ITER, 1.0)
    poly = PolynomialDecayParamScheduler(1.0, power)
    poly = WarmupParamScheduler(poly, cfg.SOLVER.WARMUP_FACTOR, warmup, cfg.SOLVER.WARMUP_METHOD)
    return LRMultiplier(optimizer, multiplier=poly, max_iter=cfg.SOLVER.MAX_ITER)
