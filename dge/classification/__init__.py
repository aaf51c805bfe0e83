"""ImageNet-style classification with DGE models (Sec. 4.1): the timm recipe, the budget loss,
evaluation of top-1 / top-5, GFLOPs and β, resumable distributed training."""
from .args import build_parser, parse_args
from .build import build_criterion, build_mixup, build_model, build_optimizer, build_scheduler, dge_model_names
from .checkpoint import load_checkpoint
from .data import UnreadableImageError, build_dataset, build_loader, build_transforms
from ..analysis.flops import outside_dge_flops
from .engine import evaluate, train_one_epoch
from .trainer import format_results, run

__all__ = [
    "UnreadableImageError",
    "build_criterion",
    "build_dataset",
    "build_loader",
    "build_mixup",
    "build_model",
    "build_optimizer",
    "build_parser",
    "build_scheduler",
    "build_transforms",
    "dge_model_names",
    "evaluate",
    "format_results",
    "load_checkpoint",
    "outside_dge_flops",
    "parse_args",
    "run",
    "train_one_epoch",
]
