#!/usr/bin/env python
"""FLOPs, parameters, activations and structure of a dge model: detectron2's
tools/analyze_model.py, with FLOPs per image that follow each image's DGE routing.

``--tasks flop`` traces every image on its own (``dge.analysis.analyze_images``), as routed
(dynamic) and with every DGE block at φ = 1 (static: the vanilla model), and prints each
image's GFLOPs, their statistics, the breakdown by module and operator, β per stage and per
DGE block (Fig. 5c; fvcore beside Eq. 7) and every op counted 0 or not at all; ``--output
DIR`` plots β per block, ``--json PATH`` writes everything.

Inputs: the first N images of cfg.DATASETS.TEST[0] after the test-time resize, or with
``--input-size H W`` N synthetic H×W colour fields of varied smoothness. Without
MODEL.WEIGHTS the model is random (seed 0): an untrained router picks the finest grain
(MODEL.DGE.INIT_FINE_PROB 0.34 makes it route by content). A Mask R-CNN count is
detectron2's inference: box head on the post-NMS proposals, mask head on the detections (a
random model has none above 0.05; SCORE_THRESH_TEST 0 gives 100).

Examples:
  python tools/analyze_model.py --tasks flop --config-file configs/mask_rcnn_pvt_s_1x.yaml \\
      --input-size 800 1280 --num-inputs 1
  python tools/analyze_model.py --tasks flop parameter --config-file configs/mask_rcnn_pvt_s_dge_1x.yaml \\
      --num-inputs 20 --json flops.json --output out/ DATASETS.TEST '("dge_synthetic_val",)' MODEL.WEIGHTS model.pth
"""
import json
import logging
import os
from typing import Any, Dict, Iterator, List

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from fvcore.nn import parameter_count_table

import dge  # noqa: F401  (registers backbones, meta-architectures, datasets)
from dge.detectron2.engine import load_weights, setup_dge_logger
from dge.analysis import analyze_images, flops_summary, format_flops_report
from dge.analysis.flops import activation_count, flop_inputs
from dge.analysis.plots import plot_block_betas
from dge.config import add_dge_config, merge_config

logger = logging.getLogger("detectron2")

RANDOM_INIT = "random initialisation, seed 0 (MODEL.WEIGHTS is empty)"
PLOT_NAME = "complexity_ratio_per_block.png"


def setup(args):
    cfg = merge_config(add_dge_config(get_cfg()), args.config_file, args.opts)
    cfg.DATALOADER.NUM_WORKERS = 0
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    setup_dge_logger(also=("fvcore", "detectron2"))
    return cfg


def build(cfg):
    """(model in eval mode, what its weights are)."""
    torch.manual_seed(0)  # a randomly initialised router routes the same way every run
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg)
        weights = cfg.MODEL.WEIGHTS
    else:
        weights = RANDOM_INIT
    logger.info(f"Model weights: {weights}")
    return model.eval(), weights


def model_inputs(cfg, args) -> Iterator[List[Dict[str, Any]]]:
    if not args.input_size:
        logger.info(f"Inputs: the first {args.num_inputs} images of {cfg.DATASETS.TEST[0]} (test-time resize)")
    return flop_inputs(cfg, args.input_size, args.num_inputs)


def do_flop(cfg, args) -> Dict[str, Any]:
    """Per-image FLOPs; returns what ``--json`` writes, plus the printed ``report``."""
    model, weights = build(cfg)
    images = analyze_images(model, model_inputs(cfg, args))
    if not images:
        raise ValueError(f"no input images: --num-inputs is {args.num_inputs} or {cfg.DATASETS.TEST[0]} is empty")
    report = f"FLOPs of {args.config_file}, weights: {weights}\n" + format_flops_report(images)
    logger.info(report)
    result = {
        "config_file": args.config_file,
        "weights": weights,
        "inputs": f"synthetic {args.input_size[0]}x{args.input_size[1]}" if args.input_size else cfg.DATASETS.TEST[0],
        "summary": flops_summary(images),
        "images": [im.to_dict() for im in images],
    }
    if args.output and images[0].layers:
        os.makedirs(args.output, exist_ok=True)
        path = os.path.join(args.output, PLOT_NAME)
        plot_block_betas(images, path)
        logger.info(f"Complexity ratio per block plotted to {path}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        logger.info(f"Wrote {args.json}")
    return dict(result, report=report)


def do_activation(cfg, args) -> Dict[str, Any]:
    model, _ = build(cfg)
    totals = [activation_count(model, data) for data in model_inputs(cfg, args)]
    n = len(totals)
    logger.info(f"Total (million) activations over {n} image(s): {np.mean(totals):.1f} ± {np.std(totals):.1f}")
    return {"activations_million": totals}


def do_parameter(cfg, args) -> None:
    logger.info("Parameter count:\n" + parameter_count_table(build(cfg)[0], max_depth=5))


def do_structure(cfg, args) -> None:
    logger.info("Model structure:\n" + str(build(cfg)[0]))


TASKS = {"flop": do_flop, "activation": do_activation, "parameter": do_parameter, "structure": do_structure}


def get_parser():
    parser = default_argument_parser(epilog=__doc__.split("Examples:", 1)[1])
    parser.add_argument("--tasks", choices=list(TASKS), required=True, nargs="+")
    parser.add_argument(
        "-n", "--num-inputs", default=100, type=int,
        help="number of images for FLOPs / activations (both depend on the image)",
    )
    parser.add_argument(
        "--input-size", nargs=2, type=int, metavar=("H", "W"),
        help="synthetic H×W input images instead of cfg.DATASETS.TEST[0]",
    )
    parser.add_argument("--json", metavar="PATH", help="write the FLOP results as JSON")
    parser.add_argument("--output", metavar="DIR", help=f"directory for the plot ({PLOT_NAME})")
    return parser


def main(args) -> Dict[str, Any]:
    if args.eval_only or args.num_gpus != 1:
        raise ValueError("analyze_model.py runs on one device; drop --eval-only / --num-gpus")
    cfg = setup(args)
    return {task: TASKS[task](cfg, args) for task in args.tasks}


if __name__ == "__main__":
    main(get_parser().parse_args())
