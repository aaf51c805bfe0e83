"""dge: the Dynamic Grained Encoder (NeurIPS 2021) for timm and detectron2.

The core imports with torch, timm and numpy alone: ``dge.layers`` (the DGE layer and its
parts), ``dge.adapters`` (``patch`` / ``unpatch`` on models you already have, one adapter per
block family), ``dge.models`` (PVT / DPVT / DeiT registered with timm, checkpoint
conversion) and ``dge.export``. ``import dge`` registers the timm models; where detectron2
is installed it also imports ``dge.detectron2``, which registers the backbones,
meta-architectures and datasets. The names below are the public API (README, "Python
API"); those of ``_NEEDS`` load on first use from the parts that need more than the core
(detectron2, fvcore, matplotlib): ``dge.config``, ``dge.detectron2``, ``dge.analysis``.
``dge.classification`` is the ImageNet trainer. docs/architecture.md draws the layers.
"""
import importlib
import importlib.util

from . import models as _models  # noqa: F401  (registration: the timm models)
from .adapters import is_patched, patch, unpatch
from .export import ExportedModel, export_module
from .layers import (
    BudgetLoss,
    ComplexityReport,
    DGEOptions,
    DynamicGrainedEncoder,
    RoutingInfo,
    allow_other_options,
    RoutingRecord,
    beta_range,
    complexity_report,
    dge_modules,
    force_granularity,
    record_routing,
    routing_stats,
    set_budget_offsets,
    use_budget,
)
from .models import checkpoint_filter_fn, convert_deit_state_dict, convert_pvt_state_dict, convert_timm_state_dict

__version__ = "0.2.0.dev0"


def _installed(name: str) -> bool:
    """Whether top-level package ``name`` can be found (a finder that refuses it: no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


if _installed("detectron2"):
    from . import detectron2  # noqa: F401  (registration: backbones, meta-archs, datasets)

# name -> its module, imported on first use (they need more than the core: detectron2, fvcore,
# matplotlib).
_NEEDS = {
    "add_dge_config": "dge.config",
    "load_config": "dge.config",
    "setup_dge_logger": "dge.detectron2.engine",
    "Predictor": "dge.detectron2.engine",
    "AtomicCheckpointer": "dge.detectron2.engine",
    "BudgetLossMixin": "dge.detectron2",
    "DGERCNN": "dge.detectron2",
    "DGESemanticSegmentor": "dge.detectron2",
    "export_detectron2_model": "dge.detectron2",
    "iter_images": "dge.detectron2.data",
    "register_synthetic_datasets": "dge.detectron2.data",
    "FlopCountAnalysis": "dge.analysis",
    "analyze_image": "dge.analysis",
    "stage_gate_maps": "dge.analysis",
}


def __getattr__(name: str):
    if name not in _NEEDS:
        raise AttributeError(f"module 'dge' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(_NEEDS[name]), name)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"dge.{name} ({_NEEDS[name]}) needs {exc.name}, which is not installed; the core (dge.patch, "
            f"dge.layers, the timm models) does not. pip install 'dge[all]' installs the rest (detectron2 "
            f"itself comes from its sources)",
            name=exc.name,
        ) from exc
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NEEDS))


__all__ = [
    # the layer, its options and what a forward decided
    "DGEOptions",
    "DynamicGrainedEncoder",
    "patch",
    "unpatch",
    "is_patched",
    "RoutingInfo",
    "RoutingRecord",
    "record_routing",
    "complexity_report",
    "ComplexityReport",
    "routing_stats",
    "dge_modules",
    "force_granularity",
    "beta_range",
    # budgets
    "BudgetLoss",
    "set_budget_offsets",
    "use_budget",
    # weights
    "allow_other_options",
    "checkpoint_filter_fn",
    "convert_pvt_state_dict",
    "convert_deit_state_dict",
    "convert_timm_state_dict",
    # export
    "export_module",
    "ExportedModel",
]
