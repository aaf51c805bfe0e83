#!/usr/bin/env python
"""Run a checkpoint with detectron2's DefaultPredictor (input-checked:
dge.detectron2.engine.Predictor) on images, a folder or a dataset, and write the visualised
predictions (boxes, masks or segmentation) with each image's β. Inputs that cannot be read or
predicted are skipped with their reason (``--strict``: stop at the first).

    python tools/predict.py --config-file configs/demo_pvt_dge_synthetic.yaml \
        --input photo.jpg folder/ skimage:coffee --output output/predictions \
        MODEL.WEIGHTS output/demo/model_final.pth
"""
import argparse
import json
import logging
import os

from typing import Optional

import cv2
import tqdm
from detectron2.data import MetadataCatalog
from detectron2.data.transforms import ResizeShortestEdge
from dge.detectron2.engine import setup_dge_logger, tool_predictor
from detectron2.utils.visualizer import ColorMode, Visualizer

import dge  # noqa: F401  (registration)
from dge.detectron2.data import DEFAULT_PHOTOS, add_image_arguments, iter_images

logger = logging.getLogger("dge.predict")


def unpredictable(predictor, h: int, w: int) -> Optional[str]:
    """Why an h×w image cannot be predicted (None: it can): the test resize
    (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST) leaves a side under the backbone's stride."""
    cfg = predictor.cfg
    rh, rw = ResizeShortestEdge.get_output_shape(h, w, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    least = max(1, getattr(predictor.model.backbone, "size_divisibility", 1))
    if min(rh, rw) >= least:
        return None
    return (f"{w}x{h} resizes to {rw}x{rh} under INPUT.MIN_SIZE_TEST {cfg.INPUT.MIN_SIZE_TEST} / MAX_SIZE_TEST "
            f"{cfg.INPUT.MAX_SIZE_TEST}: a side under the backbone's stride {least} (an aspect ratio too extreme)")


def _predict(predictor, bgr, metadata, threshold: float):
    """(the drawn image, the image's record: β and the detection count)."""
    out = predictor(bgr)
    vis = Visualizer(bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    record = {"beta": float(out["dge"]["beta"]) if "dge" in out else None}
    if "instances" in out:
        instances = out["instances"].to("cpu")
        instances = instances[instances.scores >= threshold]
        record["num_detections"] = len(instances)
        return vis.draw_instance_predictions(instances), record
    if "sem_seg" in out:
        return vis.draw_sem_seg(out["sem_seg"].argmax(dim=0).to("cpu")), record
    raise ValueError(f"no instances or sem_seg in the output of {predictor.cfg.MODEL.META_ARCHITECTURE}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    add_image_arguments(parser, output="output/predictions")
    parser.add_argument("--confidence-threshold", type=float, default=0.5)
    parser.add_argument(
        "--strict", action="store_true", help="stop at a file that cannot be predicted (default: skip it, warn)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_dge_logger()
    predictor = tool_predictor(args.config_file, args.opts, "predictions come from a randomly initialised model")
    cfg = predictor.cfg
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    os.makedirs(args.output, exist_ok=True)
    summary = {}
    inputs = args.input or ([] if args.dataset else list(DEFAULT_PHOTOS))
    skipped = None if args.strict else []
    images = list(iter_images(inputs, args.dataset, args.max_images, skipped))
    for name, bgr in tqdm.tqdm(images, desc="predict"):
        problem = unpredictable(predictor, *bgr.shape[:2])
        if problem is not None:
            if skipped is None:
                raise ValueError(f"{name}: {problem}")
            skipped.append(f"{name}: {problem}")
            continue
        drawn, record = _predict(predictor, bgr, metadata, args.confidence_threshold)
        path = os.path.join(args.output, f"{name}_pred.jpg")
        cv2.imwrite(path, drawn.get_image()[:, :, ::-1])
        summary[name] = {**record, "file": path}
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for problem in skipped or []:
        logger.warning(f"skipped {problem}")
    note = f"; skipped {len(skipped)} inputs that cannot be predicted (above)" if skipped else ""
    logger.info(f"wrote {len(summary)} images and predictions.json to {args.output}{note}")
    return summary


if __name__ == "__main__":
    main()
