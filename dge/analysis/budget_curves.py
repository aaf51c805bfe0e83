"""The budget curves: one model recalibrated to several β, models trained at several γ, and
the vanilla model on smaller inputs of matched FLOPs, each evaluated on a dataset with its
backbone latency (``tools/budget_curves.py`` is the command line)."""
import itertools
import os
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from detectron2.data import get_detection_dataset_dicts
from detectron2.data import transforms as T
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_backbone, build_model

from ..config import load_config
from ..detectron2.data.loader import build_test_loader
from ..detectron2.engine import build_evaluator, load_weights
from ..layers import record_routing
from ..models.parts import padded_size
from ..layers.calibration import block_flops
from .latency import ForwardTimer, device_sync

__all__ = [
    "FAMILIES",
    "METRICS",
    "WARMUP_FORWARDS",
    "evaluate",
    "matched_sizes",
    "resolve_run",
    "run_config",
    "scaled_test_size",
    "vanilla_block_flops",
]

METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU")  # plotted
EXTRA_METRICS = ("bbox/AP50", "segm/AP50")  # in the JSON only
WARMUP_FORWARDS = 2  # backbone forwards of each evaluation left out of its latency
LATENCY_IMAGES = 16  # evaluation images each point's backbone is timed on after the evaluations
FAMILIES = {
    "recalibrated": "one model, inference budgets",
    "trained": "trained at γ",
    "resized": "vanilla, smaller input",
}


def resolve_run(spec: str) -> Tuple[str, str]:
    """(config file, weights) of a run folder or of a checkpoint file in a run folder."""
    folder, weights = (spec, os.path.join(spec, "model_final.pth")) if os.path.isdir(spec) else (os.path.dirname(spec), spec)
    config = os.path.join(folder, "config.yaml")
    for path, what in ((config, "config.yaml"), (weights, "checkpoint")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"run {spec!r}: no {what} at {path}")
    return config, weights


def run_config(spec: str, opts: Sequence[str], **overrides):
    config, weights = resolve_run(spec)
    extra = [x for k, v in overrides.items() for x in (k.replace("__", "."), str(v))]
    cfg = load_config(config, list(opts) + ["MODEL.WEIGHTS", weights] + extra)
    cfg.freeze()
    return cfg


def evaluate(cfg, dataset: str, output_folder: str) -> Tuple[Dict[str, float], Callable[[], None]]:
    """One evaluation of ``dataset``: its metrics, the measured β (DGE models) and the median
    backbone ms per image inside it; and a function that runs the evaluated backbone on the
    next of the evaluation's first LATENCY_IMAGES inputs (for the interleaved timing)."""
    model = build_model(cfg)
    load_weights(model, cfg)
    model.eval()
    sync = device_sync(model.device)
    with ForwardTimer(model.backbone, sync, skip=WARMUP_FORWARDS) as timer:
        results = inference_on_dataset(model, build_test_loader(cfg, dataset), build_evaluator(cfg, dataset, output_folder))
    point = {"backbone_ms_in_eval": round(timer.median(), 2)}
    for metric in METRICS + EXTRA_METRICS:
        task, key = metric.split("/")
        if key in results.get(task, {}):
            point[metric] = round(float(results[task][key]), 3)
    if "beta" in results.get("routing", {}):
        point["beta"] = round(float(results["routing"]["beta"]), 4)
    with torch.no_grad():
        inputs = [model.preprocess_image(batch).tensor for _, batch in zip(range(LATENCY_IMAGES), build_test_loader(cfg, dataset))]
    backbone, turn = model.backbone, itertools.count()  # the heads are not kept for the timing

    @torch.no_grad()
    def forward() -> None:  # waits for its device, so the interleaved timing needs no sync of its own
        backbone(inputs[next(turn) % len(inputs)])
        sync()

    return point, forward


def backbone_input_size(cfg, height: int, width: int, size_divisibility: int) -> Tuple[int, int]:
    """The backbone's input size for an image of ``height`` × ``width``: resized as
    INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST (detectron2's ResizeShortestEdge) and padded."""
    hw = T.ResizeShortestEdge.get_output_shape(height, width, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return padded_size(hw, size_divisibility)


@torch.no_grad()
def vanilla_block_flops(cfg, sizes: Sequence[int], image_hw: Tuple[int, int]) -> Dict[int, float]:
    """{MIN_SIZE_TEST: encoder-block multiply-adds of the vanilla backbone on ``image_hw``
    resized to it}: the static FLOPs of the DGE twin (all regions at the finest grain)."""
    twin_cfg = cfg.clone()
    twin_cfg.defrost()
    twin_cfg.MODEL.DGE.ENABLED = True
    twin_cfg.MODEL.DEVICE = "cpu"
    twin = build_backbone(twin_cfg).eval()
    flops, by_shape = {}, {}
    for size in sizes:
        sized = scaled_test_size(cfg, size)
        shape = backbone_input_size(sized, *image_hw, twin.size_divisibility)
        if shape not in by_shape:
            with record_routing() as record:
                twin(torch.zeros(1, 3, *shape))
            by_shape[shape] = float(block_flops(twin, record)[1].sum())
        flops[size] = by_shape[shape]
    return flops


def scaled_test_size(cfg, size: int):
    """``cfg`` with INPUT.MIN_SIZE_TEST ``size`` and MAX_SIZE_TEST scaled by the same factor."""
    out = cfg.clone()
    out.defrost()
    out.INPUT.MAX_SIZE_TEST = int(round(cfg.INPUT.MAX_SIZE_TEST * size / cfg.INPUT.MIN_SIZE_TEST))
    out.INPUT.MIN_SIZE_TEST = size
    out.freeze()
    return out


def matched_sizes(cfg, dataset: str, betas: Sequence[float]) -> List[Tuple[float, int, float]]:
    """(β, MIN_SIZE_TEST, its FLOPs ratio) per β: the test size (multiples of 8, up to the
    config's) whose vanilla encoder-block FLOPs on the dataset's first image come closest to β
    times those at the config's size; of sizes with equal FLOPs (one padded shape), the largest."""
    record = get_detection_dataset_dicts([dataset], filter_empty=False)[0]
    full = cfg.INPUT.MIN_SIZE_TEST
    sizes = sorted(set(range(8, full, 8)) | {full})
    flops = vanilla_block_flops(cfg, sizes, (record["height"], record["width"]))
    out = []
    for beta in betas:
        best = min(sizes, key=lambda s: (abs(flops[s] / flops[full] - beta), -s))
        out.append((beta, best, flops[best] / flops[full]))
    return out
