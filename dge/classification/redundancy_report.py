"""The files of the spatial-redundancy analysis (Sec. 3.1, Fig. 2) of ``tools/analyze_redundancy.py``:
image batches, one probed pass over them, the statistics as plots and CSV, and the accuracy /
complexity curve."""
import csv
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import tqdm
from PIL import Image
from torch.utils.data import DataLoader, Subset

from ..analysis.plots import (
    plot_accuracy_complexity,
    plot_correlation_histogram,
    plot_layer_histograms,
    plot_layer_variance,
)
from ..analysis.redundancy import RedundancyProbe, RedundancyStats
from ..detectron2.data import iter_images
from .build import build_model
from .trainer import load_weights

__all__ = [
    "RANDOM_INIT",
    "accuracy_curve",
    "folder_batches",
    "photo_batches",
    "probed_model",
    "run_pass",
    "summary_line",
    "write_statistics",
]

logger = logging.getLogger("dge.analyze_redundancy")
RANDOM_INIT = "random initialisation, seed 0 (no --weights)"


def photo_batches(inputs: List[str], transform, batch_size: int, max_images: Optional[int]):
    """(names, [(images [B, 3, S, S], targets [B] of -1)]) from ``iter_images``."""
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


def folder_batches(dataset, root: str, transform, max_images: Optional[int], batch_size: int, workers: int):
    """(names relative to ``root``, loader) over the first ``max_images`` images of an
    ImageFolder ``dataset``."""
    dataset.transform = transform
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    names = [os.path.relpath(path, root) for path, _ in dataset.samples[:count]]
    loader = DataLoader(Subset(dataset, range(count)), batch_size, shuffle=False, num_workers=workers)
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


def accuracy_curve(
    model, batches, thresholds: Sequence[float], bins: int, device, vanilla_acc1: float, out, tag: str
) -> Tuple[Dict, Dict[str, str]]:
    """Fig. 2(b): one pass per threshold with the redundant tokens replaced; ({"baseline", "curve"},
    files); ``out(name)`` is the path of an output file."""
    baseline = {"threshold": None, "acc1": vanilla_acc1, "query_ratio": 1.0, "flops_ratio": 1.0}
    curve = []
    for t in tqdm.tqdm(sorted(thresholds), desc="thresholds"):
        replaced, acc1 = run_pass(model, batches, t, bins, device, f"threshold {t:g}")
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


def probed_model(
    name: str, weights: Optional[str], classes: Optional[List[str]], input_size: int, device: torch.device
) -> Tuple[torch.nn.Module, str]:
    """(the vanilla model ``name`` in eval mode on ``device``, with ``weights`` if given, else
    seeded random; what its weights are)."""
    torch.manual_seed(0)
    model = build_model(name, len(classes) if classes else 0, input_size, drop_path=0.0)
    path, weights = weights, RANDOM_INIT
    if path:
        missing = load_weights(model, path)
        weights = path
        if missing:
            logger.warning(f"--weights {path!r} lacks {len(missing)} tensors (left random): {missing[:4]}")
            if classes and any(k.startswith("head.") for k in missing):
                logger.warning("the classifier head is random: the accuracy curve is that of a random classifier")
    else:
        logger.warning("no --weights: the model is randomly initialised; its coefficients and accuracy are not the "
                       "paper's")
    return model.eval().to(device), weights


def summary_line(stats: RedundancyStats, summary: Dict) -> str:
    """The share of coefficients >= 0.8 and the layer whose per-image means vary most."""
    variance = stats.layer_variance()
    widest = f"layer {int(np.nanargmax(variance)) + 1}" if not np.all(np.isnan(variance)) else "none"
    return (f"{100 * summary['pooled_share_above_0.8']:.1f}% of the coefficients are >= 0.8; "
            f"largest variance across images: {widest}")
