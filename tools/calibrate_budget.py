#!/usr/bin/env python
"""Inference budgets for a trained DGE model: router offsets that make it run at another
complexity ratio β, without retraining, written into a checkpoint.

    python tools/calibrate_budget.py --config-file configs/demo_pvt_dge_synthetic.yaml \\
        --target-beta 0.3 0.4 0.6 0.8 --images dge_synthetic_val --output output/demo/model_budgets.pth \\
        MODEL.WEIGHTS output/demo/model_final.pth
    python train_net.py --config-file configs/demo_pvt_dge_synthetic.yaml --eval-only \\
        MODEL.WEIGHTS output/demo/model_budgets.pth MODEL.DGE.INFERENCE_BUDGET 0.4

For each target, one offset on every router's finest-choice logit (or one per stage,
``--per-stage``) is found by bisection (``dge.analysis.calibration.calibrate``, the one used
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

import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import dge  # noqa: F401  (registers models and datasets)
from dge.engine import setup_dge_logger
from dge.analysis.calibration import block_flops, calibrate, stage_groups
from dge.config import load_config
from dge.data import iter_images
from dge.engine import AtomicCheckpointer
from dge.files import atomic_save
from dge.layers import check_budget, record_routing, set_budget_offsets, store_budget, stored_budgets

logger = logging.getLogger("dge.calibrate_budget")
TOLERANCE = 0.01  # |β − target| above this on the calibration images: the target is out of reach


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


def load_model(cfg):
    """The DGE model of ``cfg`` with MODEL.WEIGHTS loaded; a ValueError when the weights have no
    trained routers (nothing to calibrate)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: calibrate the routers of a trained DGE checkpoint")
    if not cfg.MODEL.DGE.ENABLED:
        raise ValueError("MODEL.DGE.ENABLED is False: an inference budget needs a DGE model")
    model = build_model(cfg).eval()
    checkpointer = AtomicCheckpointer(model)
    checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
    untrained = [k for k in checkpointer.last_incompatible.missing_keys if ".router.gate." in k]
    if untrained:
        raise ValueError(
            f"MODEL.WEIGHTS {cfg.MODEL.WEIGHTS!r} has no DGE routers ({len(untrained)} router tensors missing, "
            f"e.g. {untrained[0]}): it is a vanilla or ImageNet checkpoint; train the DGE model first"
        )
    return model


def backbone_inputs(cfg, model, specs, max_images):
    """Each image as the predictor feeds it to the backbone (resized as INPUT.*_TEST, normalised)."""
    datasets = [s for s in specs if s in DatasetCatalog.list()]
    files = [s for s in specs if s not in datasets]
    images = list(iter_images(files, None, max_images))
    for name in datasets:
        left = None if max_images is None else max_images - len(images)
        images += list(iter_images([], name, left))
    if len(images) < 2:
        raise ValueError(
            f"--images {' '.join(specs)} gave {len(images)} image(s); calibration needs at least 2 "
            "(half to calibrate, half to measure)"
        )
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    tensors = []
    for _, bgr in images:
        image = bgr if cfg.INPUT.FORMAT == "BGR" else bgr[:, :, ::-1]
        image = aug.get_transform(image).apply_image(image)
        x = torch.as_tensor(image.astype("float32").transpose(2, 0, 1)).to(model.device)
        tensors.append(model.preprocess_image([{"image": x}]).tensor)
    return tensors


@torch.no_grad()
def measure(model, inputs):
    """(dynamic, static) multiply-adds per DGE block summed over ``inputs``, and each input's β."""
    dynamic = static = None
    betas = []
    for x in inputs:
        with record_routing() as record:
            model.backbone(x)
        d, s = block_flops(model.backbone, record)
        dynamic, static = (d, s) if dynamic is None else (dynamic + d, static + s)
        betas.append((d.sum() / s.sum()).item())
    return (dynamic, static), betas


def calibrate_target(model, target, calibration, held_out, per_stage):
    backbone = model.backbone
    groups = stage_groups(backbone) if per_stage else None
    apply = lambda m, offsets: set_budget_offsets(m, offsets)  # noqa: E731
    offsets, beta = calibrate(backbone, lambda: measure(model, calibration)[0], target, steps=20,
                              groups=groups, apply=apply)
    reached = abs(beta - target) <= TOLERANCE
    if not reached:
        logger.warning(
            f"β = {target:g} is out of reach of these routers (between the all-coarsest and the all-finest "
            f"routing): stored at the closest reachable β, {beta:.3f} on the calibration images"
        )
    store_budget(backbone, target)
    _, betas = measure(model, held_out)
    return dict(target=target, reached=reached, offsets=[round(o, 4) for o in offsets], beta_calibration=round(beta, 4),
                beta_held_out=round(sum(betas) / len(betas), 4), beta_held_out_per_image=[round(b, 4) for b in betas])


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
