"""Complexity ratio β (Eq. 7) and the budget loss (Eq. 8), over all DGE blocks of a model,
and a fixed routing for all of them (``force_granularity``)."""
import contextlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .encoder import DynamicGrainedEncoder
from .routing import RoutingInfo, RoutingRecord, record_routing

__all__ = [
    "BudgetLoss",
    "ComplexityReport",
    "dge_modules",
    "dge_stages",
    "complexity_report",
    "force_granularity",
    "routing_stats",
    "budget_loss",
    "beta_range",
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
    """β of a forward (``complexity_report``).

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


def _entries(record: RoutingRecord, model: Optional[nn.Module]) -> List[Tuple[str, DynamicGrainedEncoder, RoutingInfo]]:
    """(name, block, routing) of the calls in ``record``: of ``model``'s DGE blocks (each must
    have run) when a model is given, else of every call (names are indices)."""
    if model is None:
        entries = [(str(i), b, info) for i, (b, info) in enumerate(record)]
        if not entries:
            raise RuntimeError("no DGE block ran inside this record_routing()")
        return entries
    names = {m: n for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)}
    if not names:
        raise ValueError("the model has no DynamicGrainedEncoder blocks: no complexity ratio to compute")
    entries = [(names[b], b, info) for b, info in record if b in names]
    missing = sorted(set(names.values()) - {n for n, _, _ in entries})
    if missing:
        raise RuntimeError(
            f"DGE blocks {missing[:3]} did not run inside this record_routing() (run the model inside "
            "`with dge.layers.record_routing() as record:`)"
        )
    return entries


def complexity_report(record: RoutingRecord, model: Optional[nn.Module] = None) -> ComplexityReport:
    """β of the forwards in ``record`` (``dge.layers.record_routing``): of ``model``'s DGE
    blocks, named as in it, when given; else of every DGE block call in the record."""
    return _report(_entries(record, model))


def _report(entries: List[Tuple[str, DynamicGrainedEncoder, RoutingInfo]]) -> ComplexityReport:
    dynamic = torch.stack([info.dynamic_flops() for _, _, info in entries])
    static = [info.static_flops() for _, _, info in entries]
    return ComplexityReport(
        beta=dynamic.sum(dim=0) / sum(static),  # Eq. 7
        dynamic_flops=dynamic,
        static=static,
        names=[n for n, _, _ in entries],
    )


def routing_stats(model: nn.Module, record: RoutingRecord) -> Optional[Dict[str, torch.Tensor]]:
    """Per-image statistics of the DGE blocks of ``model`` in the forwards of ``record``:
    ``beta`` [B], ``beta_stage{k}`` [B] (k = 1.. in forward order) and ``share_phi{g}`` [B],
    the share of regions at granularity g. None when the model has no DGE block."""
    stages = dge_stages(model)
    if not stages:
        return None
    entries = _entries(record, model)
    report = _report(entries)
    stage_of = {name: k for k, layers in enumerate(stages.values(), start=1) for _, name, _ in layers}
    stats = OrderedDict(beta=report.beta)
    for k in range(1, len(stages) + 1):
        stats[f"beta_stage{k}"] = report.group_beta([i for i, n in enumerate(report.names) if stage_of[n] == k])
    all_maps = torch.cat([info.granularity_map.flatten(1) for _, _, info in entries], dim=1)
    for g in sorted({g for _, b, _ in entries for g in b.granularities}):
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
    if not math.isfinite(weight) or weight < 0:  # (NaN < 0 is False)
        raise ValueError(f"budget loss weight must be a finite number >= 0; got {weight}")
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

    def __call__(
        self, model: nn.Module, record: RoutingRecord
    ) -> Tuple[Optional[torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
        """(λ(β̄ − γ)², ``routing_stats(model, record)``) of the forward in ``record``; (None,
        None) without DGE blocks."""
        stats = routing_stats(model, record)
        if stats is None:
            return None, None
        return budget_loss(stats["beta"], self.budget, self.weight), stats  # Eq. 8


GranularitySpec = Union[int, Callable[[str, Tuple[int, int]], torch.Tensor]]


@contextlib.contextmanager
def force_granularity(model: nn.Module, granularity: GranularitySpec = 1) -> Iterator[None]:
    """While active, every DGE block of ``model`` is called with a fixed ``granularity_map``
    (its router does not run), by a forward pre-hook that sets the ``granularity_map``
    argument of ``DynamicGrainedEncoder.forward`` to a map of the block's region grid.
    Nested, the innermost wins.

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
        def fixed_map(regions: Tuple[int, int], device: torch.device) -> torch.Tensor:
            if isinstance(granularity, int):
                return torch.full(regions, granularity, dtype=torch.long, device=device)
            return torch.as_tensor(granularity(name, regions), device=device).long()

        def hook(module: DynamicGrainedEncoder, args, kwargs):
            device = (args[0] if args else kwargs["x"]).device
            # the block's call stays as it is; the map is made once the block knows its region grid
            return args[:2], dict(kwargs, granularity_map=lambda regions: fixed_map(regions, device))

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n), with_kwargs=True) for n, m in named]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def beta_range(model: nn.Module, run: Callable[[], object]) -> Tuple[float, float]:
    """(β with every region of every DGE block at its block's coarsest choice (0, "skip",
    where Φ has it, else max Φ), β with every region at its finest φ > 0) of ``run()``, a
    forward of ``model`` (mean over its images): the budgets the routers can reach."""
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)}

    def beta_at(pick: Callable[[Tuple[int, ...]], int]) -> float:
        def spec(name: str, regions: Tuple[int, int]) -> torch.Tensor:
            return torch.full(regions, pick(blocks[name].granularities), dtype=torch.long)

        with force_granularity(model, spec), record_routing() as record:
            run()
        return float(complexity_report(record, model).beta.mean())

    coarsest = beta_at(lambda phi: 0 if 0 in phi else max(phi))
    finest = beta_at(lambda phi: min(g for g in phi if g > 0))
    return coarsest, finest
