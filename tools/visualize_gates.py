#!/usr/bin/env python
"""Gate maps of a DGE model: which granularity each region chose, per stage (Fig. 4).

    python tools/visualize_gates.py --config-file configs/demo_pvt_dge_synthetic.yaml \
        --output output/gates MODEL.WEIGHTS output/demo/model_final.pth
    python tools/visualize_gates.py ... --input photo.jpg folder/ skimage:chelsea
    python tools/visualize_gates.py ... --dataset dge_synthetic_val --max-images 8

Writes ``<name>_gates.png`` per image (the image, then one overlay per stage: φ=1 red,
φ=2 green, φ=4 blue, as the paper) and ``gates.json`` with each image's β, query ratio per
stage and share of regions per granularity. Default input: scikit-image's photographs.
"""
import argparse
import json
import logging
import os

import tqdm
from dge.detectron2.engine import setup_dge_logger, tool_predictor

import dge  # noqa: F401
from dge.models.parts import padded_size
from dge.analysis.gates import render_gate_figure, stage_gate_maps
from dge.layers import record_routing
from dge.detectron2.data import DEFAULT_PHOTOS, add_image_arguments, iter_images

logger = logging.getLogger("dge.visualize_gates")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    add_image_arguments(parser, output="output/gates")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_dge_logger()
    inputs = args.input or ([] if args.dataset else list(DEFAULT_PHOTOS))
    predictor = tool_predictor(args.config_file, args.opts, "the gates shown are those of a randomly initialised model")
    model = predictor.model
    os.makedirs(args.output, exist_ok=True)
    summary = {}
    for name, bgr in tqdm.tqdm(list(iter_images(inputs, args.dataset, args.max_images)), desc="gate maps"):
        with record_routing() as record:
            predictions = predictor(bgr)
        resized = predictor.aug.get_transform(bgr).apply_image(bgr)
        h, w = resized.shape[:2]
        padded = padded_size((h, w), model.backbone.size_divisibility)
        stages = stage_gate_maps(model.backbone, record, padded)
        if not stages:
            raise ValueError(f"the model of {args.config_file} has no DGE blocks (MODEL.DGE.ENABLED is off)")
        stats = {k: float(v) for k, v in predictions.get("dge", {}).items()}
        title = f"{name}: β = {stats.get('beta', float('nan')):.2f}"
        fig = render_gate_figure(resized[:, :, ::-1], stages, title=title)
        path = os.path.join(args.output, f"{name}_gates.png")
        fig.savefig(path, dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        summary[name] = {
            **stats,
            "query_ratio_per_stage": {st["stage"]: float(st["query_ratio"][0]) for st in stages},
            "input_hw": [h, w],
            "figure": path,
        }
        if "instances" in predictions:
            summary[name]["num_detections"] = len(predictions["instances"])
    with open(os.path.join(args.output, "gates.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logger.info(f"wrote {len(summary)} gate maps and gates.json to {args.output}")
    return summary


if __name__ == "__main__":
    main()
