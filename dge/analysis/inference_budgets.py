"""Inference budgets of a trained detectron2 DGE model: router offsets fitted on some images
so that the model runs at another β, checked on others (``tools/calibrate_budget.py`` is the
command line; ``MODEL.DGE.INFERENCE_BUDGET`` puts one in use)."""
import logging

import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

from ..detectron2.data import iter_images
from ..detectron2.engine import load_weights
from ..layers import record_routing, set_budget_offsets, store_budget
from ..layers.calibration import block_flops, calibrate, stage_groups

__all__ = ["TOLERANCE", "backbone_inputs", "calibrate_target", "load_model", "measure"]

logger = logging.getLogger(__name__)
TOLERANCE = 0.01  # |β − target| above this on the calibration images: the target is out of reach


def load_model(cfg):
    """The DGE model of ``cfg`` with MODEL.WEIGHTS loaded; a ValueError when the weights have no
    trained routers (nothing to calibrate)."""
    if not cfg.MODEL.WEIGHTS:
        raise ValueError("MODEL.WEIGHTS is empty: calibrate the routers of a trained DGE checkpoint")
    if not cfg.MODEL.DGE.ENABLED:
        raise ValueError("MODEL.DGE.ENABLED is False: an inference budget needs a DGE model")
    model = build_model(cfg).eval()
    checkpointer = load_weights(model, cfg)
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
