"""One training epoch with the budget loss (Eq. 8), and evaluation: top-1 / top-5, GFLOPs per
image and the complexity ratio β (Eq. 7), over all processes."""
import math
import time
from collections import defaultdict
from typing import Callable, Dict, Optional, Tuple

import torch
from timm.data import Mixup
from torch import nn
from torch.nn import functional as F

from ..layers import BudgetLoss, complexity_report, record_routing, routing_stats
from .distributed import all_reduce_sums

__all__ = ["unwrap", "train_one_epoch", "evaluate"]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    *,
    epoch: int,
    step: int,
    device: torch.device,
    mixup: Optional[Mixup] = None,
    budget: BudgetLoss = BudgetLoss(),
    clip_grad: Optional[float] = None,
    print_freq: int = 50,
    log: Callable[[str], None] = print,
    on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
) -> Tuple[int, Dict[str, float]]:
    """Trains one pass over ``loader``; ``step`` counts optimizer updates since the start of training.

    Loss = task loss + ``budget`` (λ(β − γ)², Eq. 8) for a model with DGE blocks. ``on_step(step, scalars)`` is called after each update (TensorBoard).
    Returns (step after the epoch, image-weighted means over all processes of loss, loss_cls,
    loss_budget, β, β per stage, φ shares; plus lr, the last one)."""
    model.train()
    core = unwrap(model)
    sums: Dict[str, float] = defaultdict(float)
    num_steps = len(loader)
    start = time.perf_counter()
    for i, (images, targets) in enumerate(loader):
        scheduler.step_update(step)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            images, targets = mixup(images, targets)
        loss, scalars = _losses(model, core, images, targets, criterion, budget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        scalars = _to_host(scalars)  # after backward: the forward never waits for the device
        if not math.isfinite(scalars["loss"]):
            raise FloatingPointError(
                f"the loss is {scalars['loss']} at epoch {epoch}, step {step} ({scalars}); lower --lr or set "
                "--clip-grad, then --resume from the last checkpoint"
            )
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        step += 1
        n = images.shape[0]
        for k, v in scalars.items():
            sums[k] += v * n
        sums["images"] += n
        lr = optimizer.param_groups[0]["lr"]
        if on_step is not None:
            on_step(step, dict(scalars, lr=lr))
        if (i + 1) % print_freq == 0 or i + 1 == num_steps:
            rate = sums["images"] / (time.perf_counter() - start)
            log(f"epoch {epoch} [{i + 1}/{num_steps}]  {_progress(scalars)}  lr {lr:.3g}  {rate:.1f} img/s per process")
    totals = all_reduce_sums(sums, device)
    images = totals.pop("images")
    return step, dict({k: v / images for k, v in totals.items()}, lr=optimizer.param_groups[0]["lr"])


def _losses(model, core, images, targets, criterion, budget: BudgetLoss) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The loss of one batch (task loss + the budget loss of Eq. 8 with DGE blocks) and its
    scalars on the device: loss_cls, loss_budget, the routing statistics (batch means), loss."""
    with record_routing() as record:
        loss = loss_cls = criterion(model(images), targets)
    loss_budget, stats = budget(core, record)  # None without DGE blocks
    scalars = {"loss_cls": loss_cls}
    if stats is not None:
        loss = loss + loss_budget
        scalars["loss_budget"] = loss_budget
        scalars.update({k: v.mean() for k, v in stats.items()})
    scalars["loss"] = loss
    return loss, scalars


def _progress(scalars: Dict[str, float]) -> str:
    beta = f"  β {scalars['beta']:.3f}" if "beta" in scalars else ""
    return f"loss {scalars['loss']:.4f}  cls {scalars['loss_cls']:.4f}{beta}"


def _to_host(scalars: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """0-dim tensors -> floats, in one device-to-host transfer."""
    values = torch.stack([v.detach().float() for v in scalars.values()]).tolist()
    return dict(zip(scalars, values))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    device: torch.device,
    outside_flops: float,
    static_flops: float,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%; top-5 is top-min(5, classes)), cross-entropy, GFLOPs per image
    (``outside_flops`` + the image's DGE-block count; ``static_gflops`` is the vanilla model),
    and for DGE models the means of β, β per stage, β per DGE block (``beta_layer1``... in
    forward order: Fig. 5c) and the share of regions at each φ; exact over the images of all
    processes."""
    model.eval()
    core = unwrap(model)
    sums: Dict[str, float] = defaultdict(float)
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with record_routing() as record:
            logits = model(images)
        n = images.shape[0]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top == targets[:, None]
        sums["acc1"] += hits[:, 0].sum().item() * 100.0
        sums["acc5"] += hits.any(dim=1).sum().item() * 100.0
        sums["loss"] += F.cross_entropy(logits, targets, reduction="sum").item()
        sums["gflops"] += outside_flops * n / 1e9
        stats = routing_stats(core, record)  # None without DGE blocks
        if stats is not None:
            report = complexity_report(record, core)
            sums["gflops"] += report.dynamic_flops.sum().item() / 1e9
            for key, v in stats.items():
                sums[key] += v.sum().item()
            for i, layer in enumerate(report.layer_beta.sum(dim=1).tolist()):
                sums[f"beta_layer{i + 1}"] += layer
        sums["images"] += n
    totals = all_reduce_sums(sums, device)
    images = totals.pop("images")
    results = {k: v / images for k, v in totals.items()}
    results["static_gflops"] = static_flops / 1e9
    results["images"] = images
    return results
