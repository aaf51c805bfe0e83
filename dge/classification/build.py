"""The ImageNet recipe of the paper (Sec. 4.1.1, as its official code vtpack runs it on DeiT's
training script): the timm model, AdamW, cosine schedule with warm-up, mixup / cutmix with
label smoothing."""
from typing import List, Optional

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import model_entrypoint
from timm.scheduler import CosineLRScheduler
from torch import nn

from ..detectron2.engine import param_groups
from ..layers import DGEOptions

__all__ = [
    "REFERENCE_BATCH",
    "dge_model_names",
    "build_model",
    "build_optimizer",
    "build_scheduler",
    "build_mixup",
    "build_criterion",
]

# The paper's lr (1e-3) is for 128 images per batch; other batches scale it linearly.
REFERENCE_BATCH = 128


def dge_model_names() -> List[str]:
    """The timm models this project registers (PVT, DPVT, DeiT, with and without DGE)."""
    return sorted(n for n in timm.list_models() if model_entrypoint(n).__module__.startswith("dge."))


def build_model(
    name: str,
    num_classes: int,
    img_size: int,
    drop_path: float = 0.1,
    dge: Optional[DGEOptions] = None,
) -> nn.Module:
    """``timm.create_model(name, ...)`` for one of ``dge_model_names()``.

    Args:
        name: e.g. "pvt_small_dge" or "pvt_small".
        img_size: input size the position embeddings are stored for.
        dge: ``DGEOptions`` for a "_dge" model (None: the defaults); None builds any model without DGE blocks ("pvt_small_dge" then
            is "pvt_small").
    Raises:
        ValueError: an unknown name, or DGE options for a model without DGE.
    """
    names = dge_model_names()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; choose one of {names}")
    if dge is not None and not name.endswith("_dge"):
        raise ValueError(f"{name!r} has no DGE blocks: DGE options need a '_dge' model, e.g. {name}_dge")
    kwargs = dict(num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path)
    if name.endswith("_dge"):
        kwargs["dge"] = dge if dge is not None else False
    return timm.create_model(name, **kwargs)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (β1 = 0.9, the paper's momentum) over ``dge.detectron2.engine.param_groups`` with DeiT's /
    vtpack's rule: no weight decay on 1-D parameters (biases, norms), position embeddings and
    class tokens."""
    return torch.optim.AdamW(param_groups(model, lr, weight_decay, decay_1d=False), lr=lr, betas=(0.9, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    warmup_lr: float,
    min_lr: float,
) -> CosineLRScheduler:
    """Cosine decay to ``min_lr`` over all steps after a linear warm-up from ``warmup_lr``,
    updated every step (``scheduler.step_update(step)``)."""
    return CosineLRScheduler(
        optimizer,
        t_initial=epochs * steps_per_epoch,
        lr_min=min_lr,
        warmup_t=int(round(warmup_epochs * steps_per_epoch)),
        warmup_lr_init=warmup_lr,
        t_in_epochs=False,
    )


def build_mixup(mixup: float, cutmix: float, smoothing: float, num_classes: int) -> Optional[Mixup]:
    """timm's Mixup (batch mode; mixup or cutmix per batch, 50 / 50 when both are on), which also
    smooths the labels; None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=smoothing, num_classes=num_classes)


def build_criterion(mixup: Optional[Mixup], smoothing: float) -> nn.Module:
    """Soft-target cross-entropy after mixup (its targets are already smoothed), else
    label-smoothing cross-entropy, else plain cross-entropy."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()
