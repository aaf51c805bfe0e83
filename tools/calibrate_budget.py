#!/usr/bin/env python
"""Inference budgets for a trained DGE model: router offsets that make it run at another
complexity ratio β, without retraining, written into a checkpoint.

    python tools/calibrate_budget.py --config-file configs/demo_pvt_dge_synthetic.yaml \\
        --target-beta 0.3 0.4 0.6 0.8 --images dge_synthetic_val --output output/demo/model_budgets.pth \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python train_net.py --config-file configs/demo_pvt_dge_synthetic.yaml --eval-only \\
        MODEL.WEIGHTS output/demo/model_budgets.pth MODEL.DGE.INFERENCE_BUDGET 0.4

For each target, one offset on every router's finest-choice logit (or one per stage,
``--per-stage``) is found by bisection (``dge.layers.calibration.calibrate``, the one used
by the benchmarks) on the calibration half of the images, and β is then measured on the other
half (held out). The offsets are stored in the routers' budget tables (buffers saved with the
model, up to ``dge.layers.MAX_BUDGETS`` targets; earlier targets in the weights are kept), so
evaluation, ``DefaultPredictor``, FLOP analysis and export all use the target that
MODEL.DGE.INFERENCE_BUDGET names. A target the routers cannot reach (below the all-coarsest
β, above the all-finest) is stored at the closest reachable β, with a warning.
"""
import argparse
import json
import logging
import os
import re
import sys


import dge  # noqa: F401  (registers models and datasets)
from dge.detectron2.engine import setup_dge_logger
from dge.analysis.inference_budgets import backbone_inputs, calibrate_target, load_model
from dge.config import load_config
from dge.files import atomic_save
from dge.layers import check_budget, set_budget_offsets, stored_budgets

logger = logging.getLogger("dge.calibrate_budget")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--target-beta", type=float, nargs="+", required=True, metavar="BETA",
                        help="one or more complexity ratios in (0, 1]")
    parser.add_argument("--images", nargs="+", required=True, metavar="DIR_OR_DATASET",
                        help="image files, folders, skimage:NAME or registered dataset names")
    parser.add_argument("--max-images", type=int, default=None, help="at most this many images in all")
    parser.add_argument("--per-stage", action="store_true", help="one offset per stage instead of one shared")
    parser.add_argument("--output", help="checkpoint to write (default: MODEL.WEIGHTS with _budgets before .pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs (MODEL.WEIGHTS ...)")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    # "--images DIR MODEL.WEIGHTS x": the config overrides start at the first KEY.SUBKEY.
    keys = [i for i, item in enumerate(args.images) if re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", item)]
    if keys:
        args.images, args.opts = args.images[: keys[0]], args.images[keys[0]:] + args.opts
    setup_dge_logger()
    targets = [check_budget(t, "--target-beta") for t in args.target_beta]
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    model = load_model(cfg)
    inputs = backbone_inputs(cfg, model, args.images, args.max_images)
    calibration, held_out = inputs[0::2], inputs[1::2]
    results = []
    for target in targets:
        result = calibrate_target(model, target, calibration, held_out, args.per_stage)
        results.append(result)
        logger.info(
            f"β target {target:g}: offsets {result['offsets']}, β {result['beta_calibration']:.3f} on "
            f"{len(calibration)} calibration images, {result['beta_held_out']:.3f} on {len(held_out)} held out"
        )
    set_budget_offsets(model.backbone, [0.0])  # the saved model runs as trained unless a budget is chosen
    output = args.output or (os.path.splitext(cfg.MODEL.WEIGHTS)[0] + "_budgets.pth")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    atomic_save({"model": model.state_dict(), "budgets": results}, output)
    logger.info(f"wrote {output}: budgets {stored_budgets(model.backbone)} (choose one with MODEL.DGE.INFERENCE_BUDGET)")
    return {"output": output, "budgets": results}


if __name__ == "__main__":
    try:
        print(json.dumps(main(), indent=1))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
