#!/usr/bin/env python
"""Spatial redundancy of the queries of a vanilla DeiT / PVT / DPVT (Sec. 3.1, Fig. 2).

For every encoder block, the Pearson correlation coefficient of each input query (class
token left out) with the mean token of its 2×2 patch:

    python tools/analyze_redundancy.py --model deit_small_vanilla --weights deit_s.pth
    python tools/analyze_redundancy.py --model pvt_small --input photo.jpg folder/ skimage:chelsea
    python tools/analyze_redundancy.py --model deit_small_vanilla --weights deit_s.pth \\
        --data-path datasets/imagenet --max-images 5000 --thresholds 0.5 0.7 0.8 0.9 0.95 0.99

Writes to --output (default output/redundancy):
  correlation_histogram.png            Fig. 2(a): coefficients of all layers pooled
  correlation_histogram_per_layer.png  Fig. 2(a) per layer
  correlation_variance_per_layer.png   Fig. 2(c): per-image mean coefficient per layer, and its
                                       variance across images
  accuracy_vs_complexity.png           Fig. 2(b), with --data-path only
  redundancy.json                      all numbers (histograms, means, variances, the curve)
  layers.csv, image_means.csv, curve.csv

Images: --input (image files, folders, skimage:NAME; default: scikit-image's photographs), or
--data-path ROOT, an ImageNet-style folder whose ROOT/val/<class>/* images are analysed and
classified. With --data-path the accuracy / complexity curve is measured too: for each
threshold, in every block, the tokens whose coefficient exceeds it are replaced by their patch
mean (a patch with k replaced tokens computes 4 - k + [k > 0] queries; keys and values stay
dense; the exact rule is in dge/analysis/redundancy.py). Images are resized and centre-cropped
to --input-size as the classifier's evaluation does. Without --weights the model is randomly
initialised (seed 0), which the outputs say: its coefficients are not the paper's, and its
accuracy is chance.
"""
import argparse
import json
import logging
import os
from typing import Dict, List

import torch
from timm.data import resolve_data_config
from tqdm.contrib.logging import logging_redirect_tqdm

from dge.analysis.redundancy import stats_to_dict
from dge.classification.redundancy_report import RANDOM_INIT, accuracy_curve, folder_batches, photo_batches, probed_model
from dge.classification.redundancy_report import run_pass, summary_line, write_statistics
from dge.classification import build_dataset, build_transforms, dge_model_names, load_checkpoint
from dge.detectron2.data import DEFAULT_PHOTOS
from dge.detectron2.engine import run_tool, setup_dge_logger

logger = logging.getLogger("dge.analyze_redundancy")

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)


def vanilla_model_names() -> List[str]:
    return [n for n in dge_model_names() if not n.endswith("_dge")]


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_vanilla", metavar="NAME",
                        help=f"a vanilla model: {', '.join(vanilla_model_names())} (default: deit_small_vanilla)")
    parser.add_argument("--weights", metavar="PATH",
                        help="a checkpoint of tools/train_classifier.py, or an official DeiT / PVT v1 one")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="IMAGE", help="image files, folders or skimage:NAME")
    source.add_argument("--data-path", metavar="ROOT",
                        help="ImageNet-style folder: ROOT/val/<class>/* are analysed and classified (Fig. 2b)")
    parser.add_argument("--max-images", type=int, metavar="N", help="use the first N images only")
    parser.add_argument("--input-size", type=int, default=256, metavar="PIXELS", help="(default: 256, the paper's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes for --data-path")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS), metavar="T",
                        help="correlation thresholds of the accuracy / complexity curve (default: %(default)s)")
    parser.add_argument("--bins", type=int, default=100, help="histogram bins over [-1, 1] (default: 100)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--output", default="output/redundancy", metavar="DIR")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    names = vanilla_model_names()
    if args.model not in names:
        hint = f"; the vanilla model of {args.model!r} is {args.model[:-4]!r}" if args.model.endswith("_dge") else ""
        parser.error(f"--model {args.model!r} is not a vanilla model of this project; choose one of {names}{hint}")
    for flag, value, low in (("--max-images", args.max_images, 1), ("--input-size", args.input_size, 16),
                             ("--batch-size", args.batch_size, 1), ("--bins", args.bins, 1),
                             ("--workers", args.workers, 0)):
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}; got {value}")


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    setup_dge_logger()
    with logging_redirect_tqdm():
        return analyze(args)


def analyze(args: argparse.Namespace) -> Dict:
    """The analysis ``main`` runs; returns what redundancy.json holds."""
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dataset, classes = None, None
    if args.data_path:
        trained = load_checkpoint(args.weights).get("classes", ()) if args.weights else ()
        dataset = build_dataset(args.data_path, "val", None, trained)
        classes = dataset.classes
    model, weights = probed_model(args.model, args.weights, classes, args.input_size, device)
    size = args.input_size
    _, transform = build_transforms(resolve_data_config({"input_size": (3, size, size)}, model=model), "", 0.0)
    if dataset is not None:
        source = os.path.join(args.data_path, "val")
        names, batches = folder_batches(dataset, source, transform, args.max_images, args.batch_size, args.workers)
    else:
        inputs = args.input or list(DEFAULT_PHOTOS)
        names, batches = photo_batches(inputs, transform, args.batch_size, args.max_images)
        source = " ".join(inputs)
    logger.info(f"{args.model} ({weights}) on {len(names)} image(s) of {source} at {size}×{size}")

    stats, acc1 = run_pass(model, batches, None, args.bins, device, "correlation")
    result = {
        "model": args.model,
        "weights": weights,
        "random_init": weights == RANDOM_INIT,
        "input_size": size,
        "source": source,
        "num_images": len(names),
        "statistics": stats_to_dict(stats, names),
    }
    os.makedirs(args.output, exist_ok=True)
    out = lambda name: os.path.join(args.output, name)  # noqa: E731
    tag = f"{args.model}, {'random init' if weights == RANDOM_INIT else os.path.basename(weights)}, {len(names)} images"
    files = write_statistics(stats, result["statistics"], names, out, tag)
    if dataset is not None:
        curve, curve_files = accuracy_curve(model, batches, args.thresholds, args.bins, device, acc1, out, tag)
        result.update(curve)
        files.update(curve_files)
    result["files"] = dict(files, json=out("redundancy.json"))
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=1)
    logger.info(summary_line(stats, result["statistics"]))
    logger.info(f"wrote {', '.join(os.path.basename(p) for p in result['files'].values())} to {args.output}")
    return result


if __name__ == "__main__":
    run_tool(main)
