#!/usr/bin/env python
"""Per stage, what a trained model's routers score on a few images: the mean score of each
granularity (no noise), the share of regions whose argmax is each φ, the logit margin of the
finest φ, and β under the argmax routing of inference against β under the Gumbel sampling of
training (same images, same weights).

    python tools/router_scores.py --config-file configs/demo_pvt_dge_synthetic.yaml \\
        --dataset dge_synthetic_val --max-images 16 MODEL.WEIGHTS output/demo/model_final.pth

Writes router_scores.json to --output (default output/router_scores).
"""
import argparse
import json
import logging
import os

import dge  # noqa: F401  (registers models and datasets)
from dge.analysis.router_scores import format_router_scores, stage_router_scores
from dge.detectron2.data import DEFAULT_PHOTOS, add_image_arguments, iter_images
from dge.detectron2.engine import run_tool, setup_dge_logger, tool_predictor

logger = logging.getLogger("dge.router_scores")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    add_image_arguments(parser, output="output/router_scores")
    parser.add_argument("--draws", type=int, default=4, help="Gumbel draws per image (default: 4)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_dge_logger()
    predictor = tool_predictor(args.config_file, args.opts, "these are the scores of a randomly initialised model")
    images = list(iter_images(args.input or ([] if args.dataset else list(DEFAULT_PHOTOS)), args.dataset,
                              args.max_images))
    rows = stage_router_scores(predictor.model, [lambda bgr=bgr: predictor(bgr) for _, bgr in images], args.draws)
    if not rows:
        raise ValueError(f"the model of {args.config_file} has no DGE blocks with a router")
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "router_scores.json"), "w") as f:
        json.dump(dict(images=len(images), draws=args.draws, stages=rows), f, indent=1)
    logger.info(f"{len(images)} images, {args.draws} draws each:\n" + format_router_scores(rows))
    return rows


if __name__ == "__main__":
    run_tool(main)
