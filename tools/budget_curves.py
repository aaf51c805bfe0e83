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
import json
import logging
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import dge  # noqa: F401  (registers models and datasets)
from dge.detectron2.engine import run_tool, setup_dge_logger
from dge.analysis.budget_curves import (
    FAMILIES,
    METRICS,
    WARMUP_FORWARDS,
    evaluate,
    matched_sizes,
    run_config,
    scaled_test_size,
)
from dge.analysis.latency import timed_interleaved
from dge.analysis.plots import plot_budget_curves
from dge.detectron2.data import check_datasets
from dge.layers import check_budget

logger = logging.getLogger("dge.budget_curves")


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
    run_tool(main)
