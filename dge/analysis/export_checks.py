"""What ``tools/export_model.py`` exports (a timm model, a detectron2 model or its backbone,
with their preprocessing) and the checks of exported files against eager: the β an output
carries, outputs on other images (``check_exports``), and that a torch.export program does
not keep the routing it was traced with (``swap_check``)."""
import logging
from typing import Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch import nn

from ..export import ExportedModel, RoutedOutputs, binary_differences, max_difference
from ..layers import dge_modules
from ..layers.keys import OPTIONS_STATE
from ..models.parts import padded_size
from ..layers.calibration import set_logit_offset

__all__ = ["beta_of", "check_exports", "detectron2_export_source", "swap_check", "timm_export_source"]

logger = logging.getLogger(__name__)


def beta_of(outputs) -> float:
    """The image's β in an output: ``dge.beta`` of a module, ``output["dge"]["beta"]`` of a
    detectron2 model (nan without DGE blocks)."""
    if isinstance(outputs, dict):
        return float(outputs["dge.beta"][0]) if "dge.beta" in outputs else float("nan")
    return float(outputs[0]["dge"]["beta"]) if "dge" in outputs[0] else float("nan")


def swap_check(model: nn.Module, example: torch.Tensor, images: Sequence[torch.Tensor]) -> List[Dict]:
    """Trace ``model`` with every region at φ = 1 (a +30 offset on the finest logits), load the
    model's own router weights into the program and run it on ``images``; and the reverse.
    Returns one row per direction: the largest difference to eager (outputs and β) and the β
    per image. The model ends with its own weights."""
    if not dge_modules(model):
        raise ValueError("--swap-check needs a model with DGE blocks")
    own = {k: v.clone() for k, v in model.state_dict().items()}
    set_logit_offset(model, [30.0])
    all_fine = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for label, traced, run in (("traced all-fine, run as routed", all_fine, own),
                               ("traced as routed, run all-fine", own, all_fine)):
        model.load_state_dict(traced)
        program = torch.export.export(model, (example,)).module()
        program.load_state_dict({k: v for k, v in run.items() if not k.endswith(OPTIONS_STATE)})  # it has no options
        model.load_state_dict(run)
        worst, betas = 0.0, []
        for x in images:
            with torch.no_grad():
                eager, out = model(x), program(x)
            worst = max(worst, max_difference(eager, out), abs(beta_of(eager) - beta_of(out)))
            betas.append(round(beta_of(out), 4))
        rows.append(dict(case=label, max_abs_diff=worst, betas=betas))
        logger.info(f"{label}: max |exported - eager| (outputs and β) = {worst:.3g}, β per image {betas}")
    model.load_state_dict(own)
    return rows


def check_exports(
    files: Dict[str, str], run_eager: Callable, inputs: Sequence[Tuple[str, torch.Tensor]], detectron2: bool
) -> List[Dict]:
    """Each exported file (``{format: path}``) against ``run_eager`` on each (name, input):
    one row per (image, format) with the largest output difference and both β; for a
    detectron2 model also the detection counts and the mask pixels that differ."""
    loaded = {fmt: ExportedModel(path) for fmt, path in files.items()}
    rows = []
    for image_name, x in inputs:
        with torch.no_grad():
            eager = run_eager(x)
        for fmt, exported in loaded.items():
            out = exported(x)
            row = dict(image=image_name, format=fmt, max_abs_diff=max_difference(eager, out),
                       beta_eager=beta_of(eager), beta_exported=beta_of(out))
            detections = ""
            if detectron2 and "instances" in out[0]:
                row.update(detections_eager=len(eager[0]["instances"]), detections_exported=len(out[0]["instances"]))
                flipped, pixels = binary_differences(eager, out)
                row.update(mask_pixels_differing=flipped, mask_pixels=pixels)
                detections = (f", detections {row['detections_eager']} / {row['detections_exported']}, "
                              f"mask pixels differing {flipped} of {pixels}")
            rows.append(row)
            logger.info(
                f"{image_name:12s} {fmt:11s} max |exported - eager| = {row['max_abs_diff']:.3g}, "
                f"β eager {row['beta_eager']:.4f}, exported {row['beta_exported']:.4f}{detections}"
            )
    return rows


def timm_export_source(name: str, weights=None):
    """A timm model as (kind "module", ``RoutedOutputs`` of it, preprocess(bgr, (H, W)) -> its
    normalised [1, 3, H, W] input, its default (H, W))."""
    import timm

    from ..models.convert import unwrap_checkpoint

    model = timm.create_model(name, pretrained=False).eval()
    if weights:
        model.load_state_dict(unwrap_checkpoint(torch.load(weights, map_location="cpu")))
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)

    def preprocess(bgr, hw):
        rgb = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None] / 255.0
        return (x - mean) / std

    return "module", RoutedOutputs(model).eval(), preprocess, tuple(model.pretrained_cfg["input_size"][1:])


def detectron2_export_source(cfg, what: str, example_bgr):
    """The model of ``cfg`` on the CPU (MODEL.WEIGHTS loaded) as ("detectron2", model,
    image [3, H, W] of a bgr image, size) for ``what`` "model", or ("module", ``RoutedOutputs``
    of its bottom-up backbone, normalised [1, 3, H, W] input, size) for "backbone"; the size
    is the example's after INPUT.*_TEST resizing and padding."""
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

    from ..detectron2.engine import load_weights

    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg)
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    default_hw = padded_size(aug.get_transform(example_bgr).apply_image(example_bgr).shape[:2],
                             model.backbone.size_divisibility)

    def image_tensor(bgr, hw):
        img = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        img = img[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else img
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()

    if what == "model":
        return "detectron2", model, image_tensor, default_hw

    def preprocess(bgr, hw):
        return ((image_tensor(bgr, hw) - model.pixel_mean) / model.pixel_std)[None]

    return "module", RoutedOutputs(model.backbone.bottom_up).eval(), preprocess, default_hw
