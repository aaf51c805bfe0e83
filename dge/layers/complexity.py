"""Complexity ratio β (Eq. 7) and the budget loss (Eq. 8), over all DGE blocks of a model."""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .encoder import DynamicGrainedEncoder

__all__ = ["ComplexityReport", "dge_modules", "dge_stages", "complexity_report", "routing_stats", "budget_loss"]


def dge_modules(model: nn.Module) -> List[DynamicGrainedEncoder]:
    """Every DGE block of ``model``, in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, DynamicGrainedEncoder)]


def dge_stages(model: nn.Module) -> Dict[str, List[Tuple[int, str, DynamicGrainedEncoder]]]:
    """DGE blocks grouped by the module holding their block list ("...stages.0.blocks.3" ->
    "...stages.0"), in forward order: {stage: [(layer index, name, block)]}."""
    stages: Dict[str, list] = OrderedDict()
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)]
    for i, (name, m) in enumerate(named):
        key = name.rsplit(".blocks.", 1)[0] if ".blocks." in name else name.rsplit(".", 1)[0]
        stages.setdefault(key, []).append((i, name, m))
    return stages


@dataclass
class ComplexityReport:
    """β of the last forward.

    Attributes:
        beta: [B] Σ_l dynamic_l / Σ_l static_l per image; in training its gradient is the
            straight-through one of Eq. 7.
        layer_beta: [L, B] dynamic_l / static_l per DGE block.
        dynamic_flops: [L, B] multiply-adds of each DGE block per image (router included).
        static_flops: [L] multiply-adds of the same blocks in the vanilla model.
        names: [L] module names (when built from a model), else indices.
    """

    beta: torch.Tensor
    layer_beta: torch.Tensor
    dynamic_flops: torch.Tensor
    static_flops: torch.Tensor
    names: List[str]


def complexity_report(model_or_blocks: Union[nn.Module, Iterable[DynamicGrainedEncoder]]) -> ComplexityReport:
    """β of the last forward of a model (or of the given DGE blocks). Raises if a block has
    not run since it was built."""
    if isinstance(model_or_blocks, nn.Module):
        named = [(n, m) for n, m in model_or_blocks.named_modules() if isinstance(m, DynamicGrainedEncoder)]
    else:
        named = [(str(i), m) for i, m in enumerate(model_or_blocks)]
    if not named:
        raise ValueError("the model has no DynamicGrainedEncoder blocks: no complexity ratio to compute")
    missing = [n for n, m in named if m.last_routing is None]
    if missing:
        raise RuntimeError(f"DGE blocks {missing[:3]} have not run a forward yet")
    dynamic = torch.stack([m.last_routing.dynamic_flops() for _, m in named])
    static = dynamic.new_tensor([m.last_routing.static_flops() for _, m in named])
    beta = dynamic.sum(dim=0) / static.sum()  # Eq. 7
    return ComplexityReport(
        beta=beta,
        layer_beta=dynamic / static[:, None],
        dynamic_flops=dynamic,
        static_flops=static,
        names=[n for n, _ in named],
    )


def routing_stats(model: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """Per-image statistics of the last forward of the DGE blocks in ``model``:
    ``beta`` [B], ``beta_stage{k}`` [B] (k = 1.. in forward order) and ``share_phi{g}`` [B],
    the share of regions at granularity g. None when the model has no DGE block."""
    stages = dge_stages(model)
    if not stages:
        return None
    report = complexity_report(model)
    stats = OrderedDict(beta=report.beta)
    for k, layers in enumerate(stages.values(), start=1):
        rows = [i for i, _, _ in layers]
        stats[f"beta_stage{k}"] = report.dynamic_flops[rows].sum(0) / report.static_flops[rows].sum()
    named = [m for layers in stages.values() for _, _, m in layers]
    maps = [m.last_routing.granularity_map.flatten(1) for m in named]
    all_maps = torch.cat(maps, dim=1)
    for g in sorted({g for m in named for g in m.granularities}):
        stats[f"share_phi{g}"] = (all_maps == g).float().mean(dim=1)
    return stats


def budget_loss(beta: torch.Tensor, budget: float, weight: float = 1.0) -> torch.Tensor:
    """λ(β − γ)² with β averaged over the batch (Eq. 8).

    Args:
        beta: [B] complexity ratio per image.
        budget: γ ∈ [0, 1].
        weight: λ ≥ 0.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1]; got {budget}")
    if weight < 0:
        raise ValueError(f"budget loss weight must be >= 0; got {weight}")
    return weight * (beta.mean() - budget) ** 2  # Eq. 8
