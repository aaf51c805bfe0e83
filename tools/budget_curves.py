#!/usr/bin/env python
"""Accuracy against budget, for one DGE model set to several inference budgets and for the
alternatives a user has: box / mask AP (or mIoU) against the measured complexity ratio β and
against the measured backbone latency, for

(a) one trained DGE model recalibrated to several β (``tools/calibrate_budget.py`` writes the
    budgets; ``MODEL.DGE.INFERENCE_BUDGET`` picks one);
(b) DGE models trained at several budgets γ, as trained;
(c) the vanilla model evaluated on smaller inputs (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST scaled
    together), one size per β: the size whose encoder-block FLOPs, counted on the padded
    input, come closest to β times those at the vanilla model's own test size (the resize
    alternative).

    python tools/budget_curves.py --recalibrated output/demo/model_final_budgets.pth \\
        --betas 0.3 0.4 0.5 0.6 0.8 1.0 --trained output/demo_g0.25 output/demo output/demo_g0.75 \\
        --vanilla output/demo_vanilla --output output/demo/budget_curves

A RUN is a train_net.py output folder (its ``config.yaml`` and ``model_final.pth``) or a
checkpoint file (with the ``config.yaml`` of its folder). Every point is one evaluation of
DATASETS.TEST[0] (or --dataset) with detectron2's evaluator. Its backbone latency
(``backbone_ms``, plotted) is the median over --latency-runs forwards of that evaluated model
on the evaluation's first images, one image per forward, timed after all evaluations in one
interleaved loop over every point (machine drifts hit all points alike);
``backbone_ms_in_eval`` is the median of the backbone's forwards inside the evaluation, which
shares the CPU with the data loader and the evaluator. β is the evaluation's measured mean
(routing/beta) for DGE models and the FLOPs ratio of the input size for the vanilla model;
sizes that several β match are evaluated once (``beta_targets`` lists them). Trailing KEY VALUE pairs
override every run's config (e.g. MODEL.DEVICE cpu).

Writes to --output: ``budget_curves.json`` (every point) and ``budget_curves.png``.
"""
import argparse
import itertools
import json
import logging
import os
import re
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_backbone, build_model

import dge  # noqa: F401  (registers models and datasets)
from dge.engine import setup_dge_logger
from dge.analysis.calibration import block_flops
from dge.analysis.latency import ForwardTimer, device_sync, timed_interleaved
from dge.analysis.plots import plot_budget_curves
from dge.config import load_config
from dge.data import check_datasets
from dge.data.loader import build_test_loader
from dge.engine import AtomicCheckpointer, build_evaluator
from dge.layers import check_budget, record_routing
from dge.modeling.backbone.utils import padded_size

logger = logging.getLogger("dge.budget_curves")

METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU")  # plotted
EXTRA_METRICS = ("bbox/AP50", "segm/AP50")  # in the JSON only
WARMUP_FORWARDS = 2  # backbone forwards of each evaluation left out of its latency
LATENCY_IMAGES = 16  # evaluation images each point's backbone is timed on after the evaluations
FAMILIES = {
    "recalibrated": "one model, inference budgets",
    "trained": "trained at γ",
    "resized": "vanilla, smaller input",
}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recalibrated", metavar="RUN", help="a DGE checkpoint with inference budgets (a)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.8, 1.0], metavar="BETA",
                        help="the budgets of (a), and the FLOPs ratios of (c)")
    parser.add_argument("--trained", nargs="+", default=[], metavar="RUN", help="DGE models trained at budgets γ (b)")
    parser.add_argument("--vanilla", metavar="RUN", help="the vanilla model, evaluated on smaller inputs (c)")
    parser.add_argument("--dataset", help="the evaluation dataset (default: each run's DATASETS.TEST[0])")
    parser.add_argument("--output", default="output/budget_curves", help="folder for the JSON and the PNG")
    parser.add_argument("--latency-runs", type=int, default=48,
                        help="timed backbone forwards per point, interleaved over all points")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run, KEY VALUE pairs")
    return parser


def resolve_run(spec: str) -> Tuple[str, str]:
    """(config file, weights) of a run folder or of a checkpoint file in a run folder."""
    folder, weights = (spec, os.path.join(spec, "model_final.pth")) if os.path.isdir(spec) else (os.path.dirname(spec), spec)
    config = os.path.join(folder, "config.yaml")
    for path, what in ((config, "config.yaml"), (weights, "checkpoint")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run {spec!r}: no {what} at {path}")
    return config, weights


def run_config(spec: str, opts: Sequence[str], **overrides):
    config, weights = resolve_run(spec)
    extra = [x for k, v in overrides.items() for x in (k.replace("__", "."), str(v))]
    cfg = load_config(config, list(opts) + ["MODEL.WEIGHTS", weights] + extra)
    cfg.freeze()
    return cfg


def evaluate(cfg, dataset: str, output_folder: str) -> Tuple[Dict[str, float], Callable[[], None]]:
    """One evaluation of ``dataset``: its metrics, the measured β (DGE models) and the median
    backbone ms per image inside it; and a function that runs the evaluated backbone on the
    next of the evaluation's first LATENCY_IMAGES inputs (for the interleaved timing)."""
    model = build_model(cfg)
    AtomicCheckpointer(model).load(cfg.MODEL.WEIGHTS, checkpointables=[])
    model.eval()
    sync = device_sync(model.device)
    with ForwardTimer(model.backbone, sync, skip=WARMUP_FORWARDS) as timer:
        results = inference_on_dataset(model, build_test_loader(cfg, dataset), build_evaluator(cfg, dataset, output_folder))
    point = {"backbone_ms_in_eval": round(timer.median(), 2)}
    for metric in METRICS + EXTRA_METRICS:
        task, key = metric.split("/")
        if key in results.get(task, {}):
            point[metric] = round(float(results[task][key]), 3)
    if "beta" in results.get("routing", {}):
        point["beta"] = round(float(results["routing"]["beta"]), 4)
    with torch.no_grad():
        inputs = [model.preprocess_image(batch).tensor for _, batch in zip(range(LATENCY_IMAGES), build_test_loader(cfg, dataset))]
    backbone, turn = model.backbone, itertools.count()  # the heads are not kept for the timing

    @torch.no_grad()
    def forward() -> None:  # waits for its device, so the interleaved timing needs no sync of its own
        backbone(inputs[next(turn) % len(inputs)])
        sync()

    return point, forward


def backbone_input_size(cfg, height: int, width: int, size_divisibility: int) -> Tuple[int, int]:
    """The backbone's input size for an image of ``height`` × ``width``: resized as
    INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST (detectron2's ResizeShortestEdge) and padded."""
    hw = T.ResizeShortestEdge.get_output_shape(height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return padded_size(hw, size_divisibility)


@torch.no_grad()
def vanilla_block_flops(cfg, sizes: Sequence[int], image_hw: Tuple[int, int]) -> Dict[int, float]:
    """{MIN_SIZE_TEST: encoder-block multiply-adds of the vanilla backbone on ``image_hw``
    resized to it}: the static FLOPs of the DGE twin (all regions at the finest grain)."""
    twin_cfg = cfg.clone()
    twin_cfg.defrost()
    twin_cfg.MODEL.DGE.ENABLED = True
    twin_cfg.MODEL.DEVICE = "cpu"
    twin = build_backbone(twin_cfg).eval()
    flops, by_shape = {}, {}
    for size in sizes:
        sized = scaled_test_size(cfg, size)
        shape = backbone_input_size(sized, *image_hw, twin.size_divisibility)
        if shape not in by_shape:
            with record_routing() as record:
                twin(torch.zeros(1, 3, *shape))
            by_shape[shape] = float(block_flops(twin, record)[1].sum())
        flops[size] = by_shape[shape]
    return flops


def scaled_test_size(cfg, size: int):
    """``cfg`` with INPUT.MIN_SIZE_TEST ``size`` and MAX_SIZE_TEST scaled by the same factor."""
    out = cfg.clone()
    out.defrost()
    out.INPUT.MAX_SIZE_TEST = int(round(cfg.INPUT.MAX_SIZE_TEST * size / cfg.INPUT.MIN_SIZE_TEST))
    out.INPUT.MIN_SIZE_TEST = size
    out.freeze()
    return out


def matched_sizes(cfg, dataset: str, betas: Sequence[float]) -> List[Tuple[float, int, float]]:
    """(β, MIN_SIZE_TEST, its FLOPs ratio) per β: the test size (multiples of 8, up to the
    config's) whose vanilla encoder-block FLOPs on the dataset's first image come closest to β
    times those at the config's size; of sizes with equal FLOPs (one padded shape), the largest."""
    record = get_detection_dataset_dicts([dataset], filter_empty=False)[0]
    full = cfg.INPUT.MIN_SIZE_TEST
    sizes = sorted(set(range(8, full, 8)) | {full})
    flops = vanilla_block_flops(cfg, sizes, (record["height"], record["width"]))
    out = []
    for beta in betas:
        best = min(sizes, key=lambda s: (abs(flops[s] / flops[full] - beta), -s))
        out.append((beta, best, flops[best] / flops[full]))
    return out


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[Dict]]:
    args = get_parser().parse_args(argv)
    # "--trained A B MODEL.DEVICE cpu": the config overrides start at the first KEY.SUBKEY.
    keys = [i for i, item in enumerate(args.trained) if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", item)]
    if keys:
        args.trained, args.opts = args.trained[: keys[0]], args.trained[keys[0]:] + args.opts
    setup_dge_logger(also=("detectron2",))
    if not (args.recalibrated or args.trained or args.vanilla):
        raise ValueError("nothing to evaluate: give --recalibrated, --trained and / or --vanilla")
    betas = [check_budget(b, "--betas") for b in args.betas]
    if args.latency_runs < 1:
        raise ValueError(f"--latency-runs {args.latency_runs}: give at least 1")
    os.makedirs(args.output, exist_ok=True)
    points: Dict[str, List[Dict]] = {k: [] for k in FAMILIES}
    forwards: Dict[Tuple[str, int], Callable[[], None]] = {}

    def measure(family: str, label: str, cfg) -> None:
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        check_datasets([dataset])
        folder = os.path.join(args.output, "eval", f"{family}_{label}")
        metrics, forwards[family, len(points[family])] = evaluate(cfg, dataset, folder)
        point = dict(label=label, weights=cfg.MODEL.WEIGHTS, min_size_test=cfg.INPUT.MIN_SIZE_TEST, **metrics)
        points[family].append(point)
        logger.info(f"{FAMILIES[family]} {label}: {point}")

    if args.recalibrated:
        for beta in betas:
            measure("recalibrated", f"β={beta:g}", run_config(args.recalibrated, args.opts, MODEL__DGE__INFERENCE_BUDGET=beta))
    for spec in args.trained:
        cfg = run_config(spec, args.opts)
        if not cfg.MODEL.DGE.ENABLED:
            raise ValueError(f"--trained {spec}: MODEL.DGE.ENABLED is False; give the vanilla model as --vanilla")
        measure("trained", f"γ={cfg.MODEL.DGE.BUDGET:g}", cfg)
    if args.vanilla:
        cfg = run_config(args.vanilla, args.opts)
        if cfg.MODEL.DGE.ENABLED:
            raise ValueError(f"--vanilla {args.vanilla}: MODEL.DGE.ENABLED is True; give the vanilla model")
        matched: Dict[int, Tuple[float, List[float]]] = {}
        for beta, size, ratio in matched_sizes(cfg, args.dataset or cfg.DATASETS.TEST[0], betas):
            matched.setdefault(size, (ratio, []))[1].append(beta)
        for size, (ratio, targets) in matched.items():
            measure("resized", f"{size}px", scaled_test_size(cfg, size))
            points["resized"][-1].update(beta=round(ratio, 4), beta_targets=targets)
    logger.info(f"timing {len(forwards)} backbones, {args.latency_runs} forwards each, interleaved")
    for (family, i), samples in timed_interleaved(forwards, runs=args.latency_runs, warmup=WARMUP_FORWARDS).items():
        points[family][i]["backbone_ms"] = round(float(np.median(samples)), 2)
    result = {k: v for k, v in points.items() if v}
    with open(os.path.join(args.output, "budget_curves.json"), "w") as f:
        json.dump(result, f, indent=1)
    families = {FAMILIES[k]: v for k, v in result.items()}
    metrics = [m for m in METRICS if any(m in p for family in result.values() for p in family)]
    png = plot_budget_curves(families, metrics, os.path.join(args.output, "budget_curves.png"))
    logger.info(f"wrote {png} and budget_curves.json")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
