"""Dynamic, per-image FLOPs of dge models: each image traced on its own by fvcore
(``flop_count.FlopCountAnalysis``; the counting convention is described there), per DGE
block beside the analytic count of Eq. 7 that β uses, and summarised over images.

DGE routing is data dependent, and fvcore traces one concrete input: each image is traced
on its own (batch 1), so the trace records that image's query counts. The static count is
the same model with every DGE block forced to φ = 1 (``force_granularity``), which runs
exactly the vanilla blocks, without router.
"""

import itertools
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.data import build_detection_test_loader
from fvcore.nn.jit_handles import generic_activation_jit
from torch import nn
from torch.nn import functional as F

from ..layers import (
    DynamicGrainedEncoder,
    RoutingRecord,
    complexity_report,
    dge_stages,
    force_granularity,
    record_routing,
    specialize_to_input,
)
from .flop_count import FlopCountAnalysis, detectron2_analysis

__all__ = [
    "ImageFlops",
    "activation_count",
    "flop_inputs",
    "synthetic_images",
    "outside_dge_flops",
    "LayerFlops",
    "analyze_image",
    "analyze_images",
    "force_granularity",
    "module_groups",
]


# ---------------------------------------------------------------------------- per image


@dataclass
class LayerFlops:
    """One DGE block on one image (multiply-adds): counted by fvcore and analytic (Eq. 7's
    ``RoutingInfo``), dynamic (as routed, router included) and static (vanilla block)."""

    name: str
    stage: str  # as dge.layers.dge_stages groups the blocks
    counted: float
    counted_static: float
    analytic: float
    analytic_static: float

    @property
    def beta(self) -> float:
        return self.counted / self.counted_static

    @property
    def beta_analytic(self) -> float:
        return self.analytic / self.analytic_static


@dataclass
class ImageFlops:
    """FLOPs of one image (multiply-adds).

    Attributes:
        name: the image (file name, image id, or index).
        input_shape: shape of the image tensor ([C, H, W]) or of the first input.
        total / static_total: the model as routed / with every DGE block at φ = 1 (vanilla).
        by_module: group -> (dynamic, static); see ``module_groups``.
        by_operator / static_by_operator: fvcore's Counter op -> FLOPs.
        layers: the DGE blocks, in forward order (empty for a model without DGE).
        beta_analytic: β of ``dge.layers.complexity_report`` (None without DGE blocks).
        zero_flop_ops: category -> Counter(op -> occurrences) of ops counted 0.
        unsupported_ops: ops without a handle, counted 0: never silently.
    """

    name: str
    input_shape: Tuple[int, ...]
    total: float
    static_total: float
    by_module: "OrderedDict[str, Tuple[float, float]]"
    layers: List[LayerFlops]
    beta_analytic: Optional[float]
    by_operator: Counter = field(default_factory=Counter)
    static_by_operator: Counter = field(default_factory=Counter)
    zero_flop_ops: Dict[str, Counter] = field(default_factory=dict)
    unsupported_ops: Counter = field(default_factory=Counter)

    @property
    def ratio(self) -> float:
        """Dynamic / static FLOPs of the whole model."""
        return self.total / self.static_total

    @property
    def beta(self) -> Optional[float]:
        """β counted by fvcore: Σ dynamic / Σ static over the DGE blocks (Eq. 7)."""
        if not self.layers:
            return None
        return sum(l.counted for l in self.layers) / sum(l.counted_static for l in self.layers)

    def stage_betas(self) -> "OrderedDict[str, Tuple[float, float]]":
        """stage -> (counted β, analytic β) over that stage's DGE blocks."""
        sums: "OrderedDict[str, List[float]]" = OrderedDict()
        for l in self.layers:
            s = sums.setdefault(l.stage, [0.0, 0.0, 0.0, 0.0])
            s[0] += l.counted
            s[1] += l.counted_static
            s[2] += l.analytic
            s[3] += l.analytic_static
        return OrderedDict((k, (v[0] / v[1], v[2] / v[3])) for k, v in sums.items())

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "gflops": self.total / 1e9,
            "static_gflops": self.static_total / 1e9,
            "ratio": self.ratio,
            "beta": self.beta,
            "beta_analytic": self.beta_analytic,
            "by_module_gflops": {k: {"dynamic": d / 1e9, "static": s / 1e9} for k, (d, s) in self.by_module.items()},
            "by_operator_gflops": {k: v / 1e9 for k, v in self.by_operator.items()},
            "static_by_operator_gflops": {k: v / 1e9 for k, v in self.static_by_operator.items()},
            "stages": {k: {"beta": b, "beta_analytic": a} for k, (b, a) in self.stage_betas().items()},
            "layers": [
                {
                    "name": l.name,
                    "stage": l.stage,
                    "gflops": l.counted / 1e9,
                    "static_gflops": l.counted_static / 1e9,
                    "analytic_gflops": l.analytic / 1e9,
                    "analytic_static_gflops": l.analytic_static / 1e9,
                    "beta": l.beta,
                    "beta_analytic": l.beta_analytic,
                }
                for l in self.layers
            ],
            "zero_flop_ops": {k: dict(v) for k, v in self.zero_flop_ops.items()},
            "unsupported_ops": dict(self.unsupported_ops),
        }


def outside_dge_flops(model: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[float, float]:
    """(multiply-adds outside the DGE blocks, multiply-adds of the vanilla model) for one image
    of ``input_size`` (C, H, W).

    What the classifier reports per image, without a trace per image (``analyze_image``
    is the exact count, and agrees within 0.3%: tests/analysis/test_flops.py). One fvcore trace
    (``FlopCountAnalysis``, which counts fused attention and deformable sampling) gives the
    model's total; the part outside the DGE blocks (patch
    embeddings, position-embedding resampling, final norm, head) is that total minus the
    blocks' counts, and does not depend on the image. Adding an image's analytic DGE-block
    count (``RoutingInfo.dynamic_flops``, router included) gives its dynamic total; adding the
    blocks' analytic static counts gives the vanilla model (fvcore counts the vanilla block's
    shared norm once where the analytic count has it twice: < 0.2% of a block). For a model
    without DGE both numbers are its fvcore total."""
    blocks = [n for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        image = torch.zeros((1,) + tuple(input_size), device=device)
        analysis = FlopCountAnalysis(model, image).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with record_routing() as record:
            total = analysis.total()
        outside = total - sum(analysis.total(FlopCountAnalysis.traced_name(n)) for n in blocks)
        static = outside + (float(sum(complexity_report(record, model).static)) if blocks else 0.0)
    finally:
        model.train(was_training)
    return float(outside), float(static)


def module_groups(model: nn.Module) -> List[Tuple[str, str, Optional[str]]]:
    """(label, module, excluded child) of the report's breakdown: each direct child of the
    model; a child with a ``bottom_up`` network (detectron2's FPN) is split into
    ``<child>.bottom_up`` and ``<child>.fpn`` (the child minus its bottom-up network)."""
    groups = []
    for name, child in model.named_children():
        if isinstance(getattr(child, "bottom_up", None), nn.Module):
            groups.append((f"{name}.bottom_up", f"{name}.bottom_up", None))
            groups.append((f"{name}.fpn", name, f"{name}.bottom_up"))
        else:
            groups.append((name, name, None))
    return groups


def _group_totals(analysis: FlopCountAnalysis, model: nn.Module) -> "OrderedDict[str, float]":
    """label -> FLOPs of ``module_groups``, plus "other" for ops outside every child (e.g.
    detectron2's pre- and post-processing) when there are any."""
    by_module = analysis.by_module()
    t = FlopCountAnalysis.traced_name
    out = OrderedDict()
    for label, module, excluded in module_groups(model):
        value = by_module.get(t(module), 0)
        if excluded is not None:
            value -= by_module.get(t(excluded), 0)
        out[label] = float(value)
    rest = analysis.total() - sum(by_module.get(t(name), 0) for name, _ in model.named_children())
    if out and rest:
        out["other (outside submodules)"] = float(rest)
    return out


def _describe(inputs: Any, index: int = 0) -> Tuple[str, Tuple[int, ...]]:
    """(name, shape) of one image's inputs: file name / image id of a detectron2 dict."""
    first = inputs[0] if isinstance(inputs, (list, tuple)) and inputs else inputs
    if isinstance(first, dict):
        name = first.get("file_name") or first.get("image_id")
        name = os.path.basename(str(name)) if name is not None else f"image {index}"
        return name, tuple(first["image"].shape)
    return f"input {index}", tuple(first.shape) if isinstance(first, torch.Tensor) else ()


def _trace(model: nn.Module, inputs: Any) -> Tuple[FlopCountAnalysis, RoutingRecord]:
    """A finished analysis (unsupported ops go to the report, not to warnings) and the
    routing of its one forward. The trace is of this one image: DGE blocks take the
    shortcuts eager inference takes on it."""
    analysis = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with specialize_to_input(model), record_routing() as record:
        analysis.total()
    return analysis, record


def _layer_flops(model: nn.Module, report, dynamic: FlopCountAnalysis, vanilla: FlopCountAnalysis) -> List[LayerFlops]:
    """Each DGE block's counted (fvcore) and analytic (Eq. 7) FLOPs, dynamic and static."""
    t = FlopCountAnalysis.traced_name
    stages = {name: stage for stage, items in dge_stages(model).items() for _, name, _ in items}
    return [
        LayerFlops(
            name=block_name,
            stage=stages[block_name],
            counted=float(dynamic.total(t(block_name))),
            counted_static=float(vanilla.total(t(block_name))),
            analytic=float(report.dynamic_flops[i, 0]),
            analytic_static=float(report.static[i]),
        )
        for i, block_name in enumerate(report.names)
    ]


def analyze_image(model: nn.Module, inputs: Any, name: Optional[str] = None) -> ImageFlops:
    """FLOPs of ``model`` on one image: dynamic (as routed) and static (every DGE block at
    φ = 1: the vanilla model), one trace each (one in all for a model without DGE blocks).

    Args:
        inputs: one image: ``[{"image": [C, H, W], ...}]`` for a detectron2 model, or the
            model's arguments (a tensor with batch 1, or a tuple such as ``(x, hw, map)``).
        name: the image's name in the report (default: its file name / image id).
    Raises:
        ValueError: more than one image in ``inputs``, or a DGE block whose Φ lacks 1.
    """
    if isinstance(inputs, list) and len(inputs) != 1 and inputs and isinstance(inputs[0], dict):
        raise ValueError(f"per-image FLOPs trace one image at a time; got a batch of {len(inputs)}")
    label, shape = _describe(inputs)
    has_dge = any(isinstance(m, DynamicGrainedEncoder) for m in model.modules())
    was_training = model.training
    model.eval()
    try:
        dynamic, record = _trace(model, inputs)
        report = complexity_report(record, model) if has_dge else None
        if report is not None and report.beta.numel() != 1:
            raise ValueError(f"per-image FLOPs trace one image at a time; got a batch of {report.beta.numel()}")
        if has_dge:
            with force_granularity(model, 1):
                vanilla, _ = _trace(model, inputs)
        else:
            vanilla = dynamic
    finally:
        model.train(was_training)

    layers = _layer_flops(model, report, dynamic, vanilla) if report is not None else []
    dyn_groups, static_groups = _group_totals(dynamic, model), _group_totals(vanilla, model)
    by_module = OrderedDict((k, (v, static_groups.get(k, 0.0))) for k, v in dyn_groups.items())
    for k, v in static_groups.items():
        by_module.setdefault(k, (0.0, v))
    unsupported = dynamic.unsupported_ops() | vanilla.unsupported_ops()
    return ImageFlops(
        name=name or label,
        input_shape=shape,
        total=float(dynamic.total()),
        static_total=float(vanilla.total()),
        by_module=by_module,
        layers=layers,
        beta_analytic=float(report.beta[0]) if report is not None else None,
        by_operator=Counter(dynamic.by_operator()),
        static_by_operator=Counter(vanilla.by_operator()),
        zero_flop_ops=dynamic.zero_flop_ops(),
        unsupported_ops=unsupported,
    )


def analyze_images(model: nn.Module, images: Iterable[Any], names: Optional[Sequence[str]] = None) -> List[ImageFlops]:
    """``analyze_image`` for each element of ``images`` (e.g. a detectron2 test loader with
    batch 1); ``names`` default to file names, image ids or indices."""
    results = []
    for i, inputs in enumerate(images):
        label = names[i] if names is not None else _describe(inputs, i)[0]
        results.append(analyze_image(model, inputs, name=label))
    return results


def synthetic_images(size, num: int, device) -> Iterator[List[Dict[str, Any]]]:
    """``num`` batches of one H×W image: uniform random colours on a grid of cells of side
    1, 4, 16, 64, ... pixels (cycling), upsampled bilinearly to H×W; seeded by index."""
    h, w = size
    for i in range(num):
        cell = 4 ** (i % 4)
        g = torch.Generator().manual_seed(i)
        low = torch.rand(1, 3, max(h // cell, 1), max(w // cell, 1), generator=g)
        image = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0] * 255.0
        yield [{"image": image.to(device), "height": h, "width": w, "file_name": f"synthetic_{i}_cell{cell}"}]


def flop_inputs(cfg, input_size: Optional[Tuple[int, int]], num: int) -> Iterator[List[Dict[str, Any]]]:
    """``num`` one-image batches: ``synthetic_images`` of ``input_size``, or (None) the first
    images of cfg.DATASETS.TEST[0] after the test-time resize."""
    if input_size:
        return synthetic_images(input_size, num, cfg.MODEL.DEVICE)
    return itertools.islice(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0]), num)


def activation_count(model: nn.Module, inputs: Any) -> float:
    """Million activations of ``model`` on ``inputs``, counted as detectron2's analyze_model
    does (``activation_count_operators``: outputs of conv / linear / matmul), plus the outputs
    of fused attention."""
    sdpa = {"aten::scaled_dot_product_attention": generic_activation_jit()}
    return sum(detectron2_analysis.activation_count_operators(model, inputs, supported_ops=sdpa).values())
