"""Command line of ``tools/train_classifier.py``: the paper's ImageNet recipe as defaults,
and the ablation switches of Table 1 and Fig. 5."""
import argparse
from typing import Callable, List, Optional

from ..layers import BudgetLoss, DGEOptions
from ..layers.options import ESTIMATORS
from .build import REFERENCE_BATCH, dge_model_names

__all__ = ["DGE_DEFAULTS", "build_parser", "parse_args"]

# DGE switches: None on the command line means "not given"; a model without DGE refuses them.
_OPTIONS, _BUDGET = DGEOptions(), BudgetLoss()  # the defaults' one home
DGE_DEFAULTS = dict(granularities=list(_OPTIONS.granularities), region_size=_OPTIONS.region_size,
                    routing=_OPTIONS.routing, budget=_BUDGET.budget, budget_weight=_BUDGET.weight,
                    estimator=_OPTIONS.estimator)
_DGE_FLAGS = dict(granularities="--granularities", region_size="--region-size", routing="--routing",
                  budget="--budget", budget_weight="--budget-weight", estimator="--estimator")

EXAMPLES = """examples:
  # PVT-S + DGE (γ = 0.5, Φ = {1, 2, 4}) on ImageNet, 8 GPUs, 128 images per batch in all
  torchrun --nproc_per_node 8 tools/train_classifier.py --data-path datasets/imagenet --model pvt_small_dge
  # the vanilla baseline, the {0, 1} and layer-routing rows of Table 1, a budget of Fig. 5b
  ... --model pvt_small_dge --no-dge
  ... --model pvt_small_dge --granularities 0 1
  ... --model pvt_small_dge --routing layer
  ... --model pvt_small_dge --budget 0.25
  # continue the last run of an output folder; evaluate its best checkpoint
  ... --output-dir output/pvt_s_dge --resume
  ... --eval-only --resume output/pvt_s_dge/best.pth
"""


def _checked(convert: Callable, ok: Callable, requirement: str) -> Callable:
    """An argparse ``type``: ``convert(text)``, refused unless ``ok`` holds."""

    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}; got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


_positive_int = _checked(int, lambda v: v >= 1, ">= 1")
_count = _checked(int, lambda v: v >= 0, ">= 0")
_non_negative = _checked(float, lambda v: v >= 0, ">= 0")
_fraction = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
_granularity = _checked(int, lambda v: v >= 0, "an integer >= 0 (0: skip the region)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate PVT / DPVT / DeiT classifiers, with or without Dynamic Grained "
        "Encoders, on an ImageNet-style folder (Sec. 4.1 of the paper). Multi-GPU: start it with "
        "torchrun (NCCL on GPUs, gloo on CPUs).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_data_arguments, _model_arguments, _dge_arguments, _optim_arguments, _aug_arguments, _run_arguments):
        add(parser)
    return parser


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--data-path", required=True, metavar="ROOT",
                      help="folder with train/<class>/* and val/<class>/* images")
    data.add_argument("--input-size", type=_positive_int, default=256, metavar="PIXELS",
                      help="square input size for training and evaluation (default: 256, the paper's)")
    data.add_argument("--workers", type=_count, default=8, help="data-loading processes per process (default: 8)")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="pvt_small_dge", choices=dge_model_names(), metavar="NAME",
                       help="timm model of this project: pvt_{tiny,small,medium,large}[_dge], "
                       "dpvt_{tiny,small,medium}[_dge], deit_{tiny,small}_vanilla, deit_{tiny,small}_dge "
                       "(default: pvt_small_dge)")
    model.add_argument("--no-dge", action="store_true",
                       help="build a '_dge' model without DGE blocks: the vanilla baseline")
    model.add_argument("--drop-path", type=_fraction, default=0.1, metavar="RATE",
                       help="stochastic-depth rate (default: 0.1, DeiT / PVT)")
    model.add_argument("--weights", metavar="PATH",
                       help="initial weights: a checkpoint of this tool, an official PVT v1, vtpack or timm "
                       "DeiT checkpoint (converted; a classifier for other classes is left out)")


def _dge_arguments(parser: argparse.ArgumentParser) -> None:
    dge = parser.add_argument_group("dynamic grained encoder ('_dge' models only)")
    dge.add_argument("--granularities", type=_granularity, nargs="+", metavar="PHI",
                     help="candidate granularities Φ; 0 skips a region (default: %s)" % " ".join(map(str, _OPTIONS.granularities)))
    dge.add_argument("--region-size", type=_positive_int, metavar="S",
                     help="region side S, a multiple of every φ (default: max Φ)")
    dge.add_argument("--routing", choices=("region", "layer"),
                     help=f"one granularity per region, or one per block (Table 1; default: {_OPTIONS.routing})")
    dge.add_argument("--budget", type=_fraction, metavar="GAMMA",
                     help=f"target complexity ratio γ of the budget loss (Fig. 5b: 0.25 0.5 0.75 1.0; default: {_BUDGET.budget})")
    dge.add_argument("--budget-weight", type=_non_negative, metavar="LAMBDA",
                     help=f"weight λ of the budget loss λ(β − γ)² (default: {_BUDGET.weight})")
    dge.add_argument("--estimator", choices=ESTIMATORS,
                     help="router gradients in training: paper (Eq. 6-7, the chosen granularity only), "
                     "official (vtpack's default: every granularity computed) or official_sparse "
                     f"(vtpack's sparse_train) (default: {_OPTIONS.estimator})")


def _optim_arguments(parser: argparse.ArgumentParser) -> None:
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=_positive_int, default=300, help="(default: 300)")
    optim.add_argument("--batch-size", type=_positive_int, default=128,
                       help="images per step over all processes (default: 128)")
    optim.add_argument("--lr", type=_non_negative, default=1e-3,
                       help=f"AdamW learning rate for {REFERENCE_BATCH} images per step, scaled linearly "
                       "with --batch-size (default: 1e-3)")
    optim.add_argument("--weight-decay", type=_non_negative, default=0.05, help="(default: 0.05)")
    optim.add_argument("--warmup-epochs", type=_non_negative, default=5.0,
                       help="linear warm-up before the cosine decay (default: 5)")
    optim.add_argument("--warmup-lr", type=_non_negative, default=1e-6, help="(default: 1e-6)")
    optim.add_argument("--min-lr", type=_non_negative, default=1e-5, help="end of the cosine decay (default: 1e-5)")
    optim.add_argument("--clip-grad", type=_non_negative, metavar="NORM", help="clip the gradient norm (default: off)")


def _aug_arguments(parser: argparse.ArgumentParser) -> None:
    aug = parser.add_argument_group("augmentation (DeiT / vtpack defaults)")
    aug.add_argument("--aa", default="rand-m9-mstd0.5-inc1",
                     help="timm auto-augment policy, 'none' for none (default: rand-m9-mstd0.5-inc1)")
    aug.add_argument("--reprob", type=_fraction, default=0.25, help="random-erasing probability (default: 0.25)")
    aug.add_argument("--mixup", type=_non_negative, default=0.8, metavar="ALPHA",
                     help="mixup alpha, 0 for off (default: 0.8)")
    aug.add_argument("--cutmix", type=_non_negative, default=1.0, metavar="ALPHA",
                     help="cutmix alpha, 0 for off (default: 1.0)")
    aug.add_argument("--smoothing", type=_fraction, default=0.1, help="label smoothing (default: 0.1)")


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default="output/classification", metavar="DIR",
                     help="checkpoints (checkpoint.pth, best.pth), metrics.json, config.yaml and TensorBoard events "
                     "(default: output/classification)")
    run.add_argument("--resume", nargs="?", const="", metavar="PATH",
                     help="continue from a checkpoint; without PATH, from DIR/checkpoint.pth if it exists")
    run.add_argument("--eval-only", action="store_true",
                     help="evaluate the model of --resume or --weights on val/ and exit")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="(default: auto, CUDA when available)")
    run.add_argument("--seed", type=int, default=0, help="(default: 0)")
    run.add_argument("--print-freq", type=_positive_int, default=50, metavar="STEPS",
                     help="progress line every STEPS steps (default: 50)")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parsed and checked arguments, with the DGE defaults filled in for DGE models."""
    parser = build_parser()
    args = parser.parse_args(argv)
    uses_dge = args.model.endswith("_dge") and not args.no_dge
    given = [flag for key, flag in _DGE_FLAGS.items() if getattr(args, key) is not None]
    if given and not uses_dge:
        why = "--no-dge builds it without DGE blocks" if args.no_dge else f"use {args.model}_dge"
        parser.error(f"{', '.join(given)}: only for models with DGE blocks; {args.model!r} has none ({why})")
    if uses_dge:
        for key, default in DGE_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, default)
    if args.eval_only and args.resume is None and args.weights is None:
        parser.error("--eval-only needs the model to evaluate: --resume [PATH] or --weights PATH")
    if args.resume is not None and args.weights is not None:
        parser.error("give --resume (continue a run) or --weights (start from weights), not both")
    return args
