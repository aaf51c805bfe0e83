"""Complexity ratio β (Eq. 7) and the budget loss (Eq. 8), over all DGE blocks of a model,
and a fixed routing for all of them (``force_granularity``)."""
import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoder import DynamicGrainedEncoder

__all__ = [
    "BudgetLoss",
    "ComplexityReport",
    "dge_modules",
    "dge_stages",
    "complexity_report",
    "force_granularity",
    "routing_stats",
    "budget_loss",
]


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
        dynamic_flops: [L, B] multiply-adds of each DGE block per image (router included).
        static: [L] multiply-adds of the same blocks in the vanilla model (host numbers: the
            report copies nothing from the host to the device unless ``static_flops`` or
            ``layer_beta`` is read).
        names: [L] module names (when built from a model), else indices.
    """

    beta: torch.Tensor
    dynamic_flops: torch.Tensor
    static: List[float]
    names: List[str]

    @property
    def static_flops(self) -> torch.Tensor:
        """[L] ``static`` as a tensor beside ``dynamic_flops``."""
        return self.dynamic_flops.new_tensor(self.static)

    @property
    def layer_beta(self) -> torch.Tensor:
        """[L, B] dynamic_l / static_l per DGE block."""
        return self.dynamic_flops / self.static_flops[:, None]

    def group_beta(self, rows: Sequence[int]) -> torch.Tensor:
        """[B] β of the DGE blocks ``rows`` (e.g. one stage's)."""
        return self.dynamic_flops[list(rows)].sum(0) / sum(self.static[i] for i in rows)


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
    static = [m.last_routing.static_flops() for _, m in named]
    return ComplexityReport(
        beta=dynamic.sum(dim=0) / sum(static),  # Eq. 7
        dynamic_flops=dynamic,
        static=static,
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
        stats[f"beta_stage{k}"] = report.group_beta([i for i, _, _ in layers])
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


@dataclass(frozen=True)
class BudgetLoss:
    """The budget loss of Eq. 8 applied to a model after its forward: the one place both
    trainers (detectron2's ``BudgetLossMixin``, the classifier) take it from.

    Attributes:
        budget: γ ∈ [0, 1], the target complexity ratio.
        weight: λ ≥ 0.
    """

    budget: float = 0.5
    weight: float = 1.0

    def __post_init__(self):
        budget_loss(torch.zeros(1), self.budget, self.weight)  # the same checks and messages

    def __call__(self, model: nn.Module) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
        """(λ(β̄ − γ)², ``routing_stats(model)``) of the last forward; (None, None) without DGE blocks."""
        stats = routing_stats(model)
        if stats is None:
            return None, None
        return budget_loss(stats["beta"], self.budget, self.weight), stats  # Eq. 8


GranularitySpec = Union[int, Callable[[str, Tuple[int, int]], torch.Tensor]]


@contextlib.contextmanager
def force_granularity(model: nn.Module, granularity: GranularitySpec = 1) -> Iterator[None]:
    """While active, every DGE block of ``model`` is called with a fixed ``granularity_map``
    (its router does not run), by a forward pre-hook that fills the ``granularity_map``
    argument of ``DynamicGrainedEncoder.forward(x, hw, granularity_map)``. Nested, the
    innermost wins.

    Args:
        granularity: an int φ for every region (1: each block runs exactly its vanilla block:
            the static model), or ``fn(block_name, (Hr, Wr)) -> [Hr, Wr] or [B, Hr, Wr]``
            long map of values in the block's Φ.
    Raises:
        ValueError: an int ``granularity`` not in the Φ of every DGE block.
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)]
    if isinstance(granularity, int):
        bad = [(n, m.granularities) for n, m in named if granularity not in m.granularities]
        if bad:
            raise ValueError(
                f"granularity {granularity} is not in Φ of DGE block {bad[0][0]!r}; allowed: {bad[0][1]}"
            )

    def make_hook(name: str):
        def hook(module: DynamicGrainedEncoder, args, kwargs):
            kwargs = dict(kwargs)
            names = ("x", "hw", "granularity_map")
            kwargs.update({k: a for k, a in zip(names, args)})
            x, hw = kwargs["x"], kwargs["hw"]
            regions = module.layout(hw, x.device).regions_hw
            if isinstance(granularity, int):
                gmap = torch.full((x.shape[0],) + regions, granularity, dtype=torch.long, device=x.device)
            else:
                gmap = torch.as_tensor(granularity(name, regions), device=x.device).long()
                gmap = gmap.expand((x.shape[0],) + regions) if gmap.dim() == 2 else gmap
            kwargs["granularity_map"] = gmap
            return (), kwargs

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in named]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
