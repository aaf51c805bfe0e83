"""dge: the Dynamic Grained Encoder (NeurIPS 2021) for detectron2 and timm.

``import dge`` registers every backbone, meta-architecture, dataset and timm model. The
names below are the public API (README, "Python API"); the subpackages hold the rest:
``dge.layers`` (the DGE layer and its parts), ``dge.modeling`` (backbones,
meta-architectures), ``dge.engine`` (trainer pieces), ``dge.analysis`` (FLOPs, latency, gate
maps), ``dge.data``, ``dge.export``, ``dge.classification``.
"""
from . import data as _data  # noqa: F401  (registration: the synthetic datasets)
from . import modeling as _modeling  # noqa: F401  (registration: backbones, meta-archs, timm models)
from .analysis import FlopCountAnalysis, analyze_image, stage_gate_maps
from .config import add_dge_config, load_config
from .data import iter_images, register_synthetic_datasets
from .engine import AtomicCheckpointer, Predictor, setup_dge_logger
from .export import ExportedModel, export_detectron2_model, export_module
from .layers import (
    BudgetLoss,
    ComplexityReport,
    DGEOptions,
    DynamicGrainedEncoder,
    RoutingInfo,
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
from .modeling.backbone.convert import checkpoint_filter_fn, convert_deit_state_dict, convert_pvt_state_dict
from .modeling.meta_arch import DGERCNN, BudgetLossMixin, DGESemanticSegmentor
from .modeling.timm_patch import patch, unpatch

__version__ = "0.2.0.dev0"

__all__ = [
    # set-up and config
    "add_dge_config",
    "load_config",
    "setup_dge_logger",
    # the layer, its options and what a forward decided
    "DGEOptions",
    "DynamicGrainedEncoder",
    "patch",
    "unpatch",
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
    # detectron2
    "BudgetLossMixin",
    "DGERCNN",
    "DGESemanticSegmentor",
    "Predictor",
    "AtomicCheckpointer",
    # weights
    "checkpoint_filter_fn",
    "convert_pvt_state_dict",
    "convert_deit_state_dict",
    # analysis and export
    "FlopCountAnalysis",
    "analyze_image",
    "stage_gate_maps",
    "export_module",
    "export_detectron2_model",
    "ExportedModel",
    # data
    "iter_images",
    "register_synthetic_datasets",
]
