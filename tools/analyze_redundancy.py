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
import csv
import json
import logging
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import tqdm
from timm.data import resolve_data_config
from tqdm.contrib.logging import logging_redirect_tqdm


from dge.engine import setup_dge_logger
from dge.analysis.plots import (
    plot_accuracy_complexity,
    plot_correlation_histogram,
    plot_layer_histograms,
    plot_layer_variance,
)
from dge.analysis.redundancy import RedundancyProbe, RedundancyStats, stats_to_dict
from dge.classification import (
    build_dataset,
    build_model,
    build_transforms,
    dge_model_names,
    load_checkpoint,
)
from dge.classification.trainer import load_weights
from dge.data import DEFAULT_PHOTOS, iter_images

logger = logging.getLogger("dge.analyze_redundancy")

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99)
RANDOM_INIT = "random initialisation, seed 0 (no --weights)"


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


def build(args: argparse.Namespace, classes: Optional[List[str]], device: torch.device) -> Tuple[torch.nn.Module, str]:
    """(the model in eval mode on ``device``, what its weights are)."""
    torch.manual_seed(0)
    model = build_model(args.model, len(classes) if classes else 0, args.input_size, drop_path=0.0)
    weights = RANDOM_INIT
    if args.weights:
        missing = load_weights(model, args.weights)
        weights = args.weights
        if missing:
            logger.warning(f"--weights {args.weights!r} lacks {len(missing)} tensors (left random): {missing[:4]}")
            if classes and any(k.startswith("head.") for k in missing):
                logger.warning("the classifier head is random: the accuracy curve is that of a random classifier")
    else:
        logger.warning("no --weights: the model is randomly initialised; its coefficients and accuracy are not the "
                       "paper's")
    return model.eval().to(device), weights


def photo_batches(inputs: List[str], transform, batch_size: int, max_images: Optional[int]):
    """(names, [(images [B, 3, S, S], targets [B] of -1)]) from ``iter_images``."""
    from PIL import Image

    names, tensors = [], []
    for name, bgr in iter_images(inputs, max_images=max_images):
        names.append(name)
        tensors.append(transform(Image.fromarray(bgr[:, :, ::-1].copy())))
    if not tensors:
        raise FileNotFoundError(
            f"no images found in --input {inputs}: give image files, folders of images or skimage:NAME"
        )
    batches = []
    for i in range(0, len(tensors), batch_size):
        chunk = torch.stack(tensors[i : i + batch_size])
        batches.append((chunk, torch.full((chunk.shape[0],), -1, dtype=torch.long)))
    return names, batches


def folder_loader(args: argparse.Namespace, dataset, transform):
    """(names, loader) over the first --max-images images of ROOT/val."""
    from torch.utils.data import DataLoader, Subset

    dataset.transform = transform
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    root = os.path.join(args.data_path, "val")
    names = [os.path.relpath(path, root) for path, _ in dataset.samples[:count]]
    loader = DataLoader(Subset(dataset, range(count)), args.batch_size, shuffle=False, num_workers=args.workers)
    return names, loader


@torch.no_grad()
def run_pass(
    model, batches, threshold: Optional[float], bins: int, device, desc: str
) -> Tuple[RedundancyStats, Optional[float]]:
    """One pass over ``batches`` under a ``RedundancyProbe``: (its statistics, top-1 % or None
    for unlabelled images)."""
    correct = labelled = 0
    with RedundancyProbe(model, threshold, bins) as probe:
        for images, targets in tqdm.tqdm(batches, desc=desc, leave=False):
            logits = model(images.to(device))
            known = targets >= 0
            if known.any():
                correct += (logits.argmax(dim=1).cpu()[known] == targets[known]).sum().item()
                labelled += int(known.sum())
    return probe.stats(), (100.0 * correct / labelled if labelled else None)


def write_csv(path: str, header: List[str], rows: Iterator[List]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_statistics(stats: RedundancyStats, summary: Dict, names: List[str], out, tag: str) -> Dict[str, str]:
    """Fig. 2(a) and 2(c) as PNGs, the per-layer and per-image numbers (``summary``:
    ``stats_to_dict``) as CSV; returns the files."""
    files = {
        "histogram": plot_correlation_histogram(
            stats.edges, stats.histograms.sum(0), out("correlation_histogram.png"),
            f"Correlation with the 2×2 patch mean, all layers\n{tag}"),
        "histogram_per_layer": plot_layer_histograms(
            stats.edges, stats.histograms, stats.names, out("correlation_histogram_per_layer.png"), tag),
        "variance_per_layer": plot_layer_variance(
            stats.image_means, out("correlation_variance_per_layer.png"),
            f"Mean coefficient per image and layer\n{tag}"),
        "layers_csv": out("layers.csv"),
        "image_means_csv": out("image_means.csv"),
    }
    columns = ["layer", "name", "h", "w", "mean", "variance_across_images", "share_above_0.8"]
    write_csv(files["layers_csv"], columns,
              ([l["layer"], l["name"], *l["hw"], *(l[k] for k in columns[4:])] for l in summary["layers"]))
    write_csv(files["image_means_csv"], ["image"] + [f"layer{i + 1}" for i in range(len(stats.names))],
              ([n] + row.tolist() for n, row in zip(names, stats.image_means)))
    return files


def accuracy_curve(model, batches, args, device, vanilla_acc1: float, out, tag: str) -> Tuple[Dict, Dict[str, str]]:
    """Fig. 2(b): one pass per threshold with the redundant tokens replaced; ({"baseline", "curve"},
    files)."""
    baseline = {"threshold": None, "acc1": vanilla_acc1, "query_ratio": 1.0, "flops_ratio": 1.0}
    curve = []
    for t in tqdm.tqdm(sorted(args.thresholds), desc="thresholds"):
        replaced, acc1 = run_pass(model, batches, t, args.bins, device, f"threshold {t:g}")
        curve.append({
            "threshold": t,
            "acc1": acc1,
            "query_ratio": replaced.query_ratio,
            "flops_ratio": replaced.flops_ratio,
            "layer_query_ratio": (replaced.queries / replaced.tokens).tolist(),
        })
        logger.info(f"threshold {t:g}: top-1 {acc1:.2f}%  queries {100 * replaced.query_ratio:.1f}%  "
                    f"FLOPs {100 * replaced.flops_ratio:.1f}%  (vanilla top-1 {vanilla_acc1:.2f}%)")
    files = {
        "accuracy_vs_complexity": plot_accuracy_complexity(
            curve, out("accuracy_vs_complexity.png"), vanilla_acc1,
            f"Replacing redundant tokens by their patch mean\n{tag}"),
        "curve_csv": out("curve.csv"),
    }
    write_csv(files["curve_csv"], ["threshold", "acc1", "query_ratio", "flops_ratio"],
              (["vanilla" if r["threshold"] is None else r["threshold"], r["acc1"], r["query_ratio"], r["flops_ratio"]]
               for r in [baseline] + curve))
    return {"baseline": baseline, "curve": curve}, files


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
    model, weights = build(args, classes, device)
    size = args.input_size
    _, transform = build_transforms(resolve_data_config({"input_size": (3, size, size)}, model=model), "", 0.0)
    if dataset is not None:
        names, batches = folder_loader(args, dataset, transform)
        source = os.path.join(args.data_path, "val")
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
        curve, curve_files = accuracy_curve(model, batches, args, device, acc1, out, tag)
        result.update(curve)
        files.update(curve_files)
    result["files"] = dict(files, json=out("redundancy.json"))
    with open(result["files"]["json"], "w") as f:
        json.dump(result, f, indent=1)
    variance = stats.layer_variance()
    widest = f"layer {int(np.nanargmax(variance)) + 1}" if not np.all(np.isnan(variance)) else "none"
    logger.info(f"{100 * result['statistics']['pooled_share_above_0.8']:.1f}% of the coefficients are >= 0.8; "
                f"largest variance across images: {widest}")
    logger.info(f"wrote {', '.join(os.path.basename(p) for p in result['files'].values())} to {args.output}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
