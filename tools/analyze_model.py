#!/usr/bin/env python
"""FLOPs, parameters, activations and structure of a dge model: detectron2's
tools/analyze_model.py, with FLOPs per image that follow each image's DGE routing.

``--tasks flop`` traces every image on its own (``dge.analysis.analyze_images``): the model
as routed (dynamic) and the same model with every DGE block at granularity 1 (static: the
vanilla model). It prints the GFLOPs of each image, their mean ± std, min and max, the
breakdown by module and operator, the complexity ratio β per stage and per DGE block (the
paper's Fig. 5c) counted by fvcore beside the analytic count of Eq. 7, and every op counted
0 or not counted at all; ``--output DIR`` also writes the per-block β as a PNG plot and
``--json PATH`` everything as JSON.

Inputs are the first N images of cfg.DATASETS.TEST[0] after the test-time resize (e.g.
``DATASETS.TEST '("dge_synthetic_val",)'``, the built-in synthetic set), or, with
``--input-size H W``, N synthetic H×W images (smooth random colour fields, one smoothness
scale per image, so that a trained router sees different content). Without MODEL.WEIGHTS
the model is randomly initialised: FLOPs of the vanilla parts do not depend on weights, the
routing is that of an untrained router (its initial bias picks the finest granularity;
MODEL.DGE.INIT_FINE_PROB 0.34 makes an untrained router route by content).

What a Mask R-CNN count includes is detectron2's inference: the box head runs on the RPN's
post-NMS proposals (MODEL.RPN.POST_NMS_TOPK_TEST, 1000), the mask head on the detections
(at most TEST.DETECTIONS_PER_IMAGE = 100 scoring above MODEL.ROI_HEADS.SCORE_THRESH_TEST),
so a randomly initialised model (no detection above 0.05) counts no mask RoI;
SCORE_THRESH_TEST 0 gives 100. The counts against the paper's are in projects/DGE/README.md.

Examples:
  python tools/analyze_model.py --tasks flop --config-file configs/mask_rcnn_pvt_s_1x.yaml \\
      --input-size 800 1280 --num-inputs 1
  python tools/analyze_model.py --tasks flop parameter --config-file configs/mask_rcnn_pvt_s_dge_1x.yaml \\
      --num-inputs 20 --json flops.json --output out/ DATASETS.TEST '("dge_synthetic_val",)' MODEL.WEIGHTS model.pth
"""
import itertools
import json
import logging
import os
from typing import Any, Dict, Iterator, List

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from fvcore.nn import parameter_count_table
from fvcore.nn.jit_handles import generic_activation_jit

import dge  # noqa: F401  (registers backbones, meta-architectures, datasets)
from dge.engine import setup_dge_logger
from dge.analysis import analyze_images, flops_summary, format_flops_report
from dge.analysis.flops import synthetic_images
from dge.analysis.plots import plot_block_betas
from dge.analysis.flop_count import detectron2_analysis
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
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
        weights = cfg.MODEL.WEIGHTS
    else:
        weights = RANDOM_INIT
    logger.info(f"Model weights: {weights}")
    return model.eval(), weights


def model_inputs(cfg, args) -> Iterator[List[Dict[str, Any]]]:
    if args.input_size:
        return synthetic_images(args.input_size, args.num_inputs, cfg.MODEL.DEVICE)
    dataset = cfg.DATASETS.TEST[0]
    logger.info(f"Inputs: the first {args.num_inputs} images of {dataset} (test-time resize)")
    return itertools.islice(build_detection_test_loader(cfg, dataset), args.num_inputs)


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
    """Activations per image, counted as detectron2's analyze_model does
    (``activation_count_operators``: outputs of conv / linear / matmul), plus the outputs of
    fused attention."""
    model, _ = build(cfg)
    sdpa = {"aten::scaled_dot_product_attention": generic_activation_jit()}
    totals = [
        sum(detectron2_analysis.activation_count_operators(model, data, supported_ops=sdpa).values())
        for data in model_inputs(cfg, args)
    ]
    n = len(totals)
    logger.info(f"Total (million) activations over {n} image(s): {np.mean(totals):.1f} ± {np.std(totals):.1f}")
    return {"activations_million": totals}


def do_parameter(cfg, args) -> None:
    model, _ = build(cfg)
    logger.info("Parameter count:\n" + parameter_count_table(model, max_depth=5))


def do_structure(cfg, args) -> None:
    model, _ = build(cfg)
    logger.info("Model structure:\n" + str(model))


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
