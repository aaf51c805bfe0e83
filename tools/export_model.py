#!/usr/bin/env python
"""Export a dge model with its weights as a graph that keeps its dynamic routing, and check
it against the eager model on other images.

    # the demo's Mask R-CNN through detectron2's tracing path (TorchScript)
    python tools/export_model.py --config-file configs/demo_pvt_dge_synthetic.yaml \\
        --format torchscript --check skimage:chelsea skimage:coffee skimage:rocket \\
        --output output/export MODEL.WEIGHTS output/demo/model_final.pth
    # a backbone, or a timm model, as torch.export and ONNX (onnxruntime) files
    python tools/export_model.py --config-file configs/mask_rcnn_pvt_s_dge_1x.yaml --what backbone \\
        --input-size 800 1280 --format exported onnx --check skimage:coffee
    python tools/export_model.py --timm-model deit_small_dge --format exported onnx torchscript

What is exported: a config's whole detectron2 model (``--what model``: its
``forward([{"image": ...}])``, through detectron2's ``TracingAdapter`` as detectron2's
``tools/deploy/export_model.py --export-method tracing``), the config's bottom-up backbone
(``--what backbone``: normalised [1, 3, H, W] -> res2..res5), or a timm model
(``--timm-model NAME``, [1, 3, H, W] -> logits). Backbones and timm models also output each
image's β and routing statistics (``dge.beta``, ``dge.beta_stage1``, ...); whole models
carry them in ``output["dge"]``. Formats: ``exported`` (torch.export, ``.pt2``), ``onnx``
(``torch.onnx.export(dynamo=True)``, run by onnxruntime) and ``torchscript``
(``torch.jit.trace``). An export is made at batch 1 for one input size: ``--input-size``
(default: the export image after the config's test resize, padded to the backbone's
stride; a timm model's input size), from ``--export-image``.

``--check IMAGES...`` runs every exported file beside the eager model on each image (resized
to the export size) and prints the largest difference of all numeric outputs (pasted binary
masks: how many pixels differ) and each image's β, eager and exported. ``--random-routers BETA`` gives an untrained model routers that route by
content (random gate weights, then one logit offset calibrated to β on the export image),
so that images differ in their routing. ``--swap-check`` (backbones, timm models) also shows
that a torch.export program does not keep the routing it was traced with: traced with every
region at φ = 1 and run with the model's routers on the check images, and the reverse.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch


import dge  # noqa: F401  (registration)
from dge.engine import setup_dge_logger
from dge.analysis.calibration import calibrate, randomize_routers
from dge.config import load_config
from dge.data import iter_images
from dge.export import (
    FILE_SUFFIXES,
    FORMATS,
    ExportError,
    check_detectron2_format,
    ExportedModel,
    RoutedOutputs,
    binary_differences,
    export_detectron2_model,
    export_module,
    max_difference,
)
from dge.layers import dge_modules
from dge.modeling.backbone.utils import padded_size

logger = logging.getLogger("dge.export")


def build(args):
    """-> (kind, eager module, preprocess(bgr uint8 [H, W, 3]) -> its input, default (H, W))."""
    if args.timm_model:
        import timm

        model = timm.create_model(args.timm_model, pretrained=False).eval()
        if args.weights:
            from dge.modeling.backbone.convert import unwrap_checkpoint

            model.load_state_dict(unwrap_checkpoint(torch.load(args.weights, map_location="cpu")))
        mean = torch.tensor(model.pretrained_cfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(model.pretrained_cfg["std"]).view(1, 3, 1, 1)

        def preprocess(bgr, hw):
            rgb = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
            x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None] / 255.0
            return (x - mean) / std

        return "module", RoutedOutputs(model).eval(), preprocess, tuple(model.pretrained_cfg["input_size"][1:])

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    elif not args.random_routers:
        logger.warning("MODEL.WEIGHTS is empty: the model is randomly initialised")
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    first = next(iter_images([args.export_image]))[1]
    h, w = aug.get_transform(first).apply_image(first).shape[:2]
    default_hw = padded_size((h, w), model.backbone.size_divisibility)

    def image_tensor(bgr, hw):
        img = cv2.resize(bgr, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
        img = img[:, :, ::-1] if cfg.INPUT.FORMAT == "RGB" else img
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()

    if args.what == "model":
        return "detectron2", model, image_tensor, default_hw

    def preprocess(bgr, hw):
        x = image_tensor(bgr, hw)
        return ((x - model.pixel_mean) / model.pixel_std)[None]

    return "module", RoutedOutputs(model.backbone.bottom_up).eval(), preprocess, default_hw


def beta_of(outputs) -> float:
    """The image's β in an output: ``dge.beta`` of a module, ``output["dge"]["beta"]`` of a
    detectron2 model (nan without DGE blocks)."""
    if isinstance(outputs, dict):
        return float(outputs["dge.beta"][0]) if "dge.beta" in outputs else float("nan")
    return float(outputs[0]["dge"]["beta"]) if "dge" in outputs[0] else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-file", help="a detectron2 config (dge's keys included)")
    source.add_argument("--timm-model", help="a timm model name, e.g. pvt_small_dge")
    parser.add_argument("--what", choices=["model", "backbone"], default="model", help="with --config-file")
    parser.add_argument("--weights", help="with --timm-model: a checkpoint of it")
    parser.add_argument("--format", nargs="+", choices=FORMATS, help="default: torchscript for a whole model, else exported")
    parser.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--export-image", default="skimage:astronaut", help="image the export is traced on")
    parser.add_argument("--check", nargs="*", default=[], help="images to compare exported and eager outputs on")
    parser.add_argument("--random-routers", type=float, metavar="BETA", help="untrained routers routing at this β")
    parser.add_argument(
        "--swap-check", action="store_true",
        help="with --check, a module and the exported format: also trace under all-fine routing and run the "
        "program with the model's routers on the check images, and the reverse",
    )
    parser.add_argument("--output", default="output/export")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.opts[:1] == ["--"]:  # "--check A B -- KEY VALUE": the overrides after the images
        args.opts = args.opts[1:]
    setup_dge_logger()
    torch.manual_seed(0)
    if args.config_file and args.what == "model":
        try:
            for fmt in args.format or []:
                check_detectron2_format(fmt)
        except ValueError as e:
            parser.error(str(e))

    if args.swap_check and (args.what == "model" and not args.timm_model or not args.check):
        parser.error("--swap-check takes a backbone or a timm model (--what backbone / --timm-model) and --check images")
    kind, model, preprocess, default_hw = build(args)
    hw = tuple(args.input_size) if args.input_size else default_hw
    formats = args.format or (["torchscript"] if kind == "detectron2" else ["exported"])
    example = preprocess(next(iter_images([args.export_image]))[1], hw)
    run_eager = (lambda x: model([{"image": x}])) if kind == "detectron2" else model
    if args.random_routers is not None:
        if not dge_modules(model):
            parser.error("--random-routers needs a model with DGE blocks")
        randomize_routers(model)
        _, beta = calibrate(model, lambda: run_eager(example), args.random_routers)
        logger.info(f"routers re-initialised and calibrated: β = {beta:.3f} on the export image")

    os.makedirs(args.output, exist_ok=True)
    name = args.timm_model or (Path(args.config_file).stem + ("" if args.what == "model" else "_backbone"))
    meta = dict(source=args.timm_model or args.config_file, what="timm" if args.timm_model else args.what)
    files, failed = {}, []
    for fmt in formats:
        path = os.path.join(args.output, name + FILE_SUFFIXES[fmt])
        try:
            if kind == "detectron2":
                export_detectron2_model(model, example, path, fmt, **meta)
            else:
                export_module(model, example, path, fmt, **meta)
        except ExportError as exc:
            logger.error(str(exc))
            failed.append(fmt)
            continue
        files[fmt] = path
        logger.info(f"{fmt}: wrote {path} (input {list(example.shape)})")

    rows = []
    if args.check:
        loaded = {fmt: ExportedModel(path) for fmt, path in files.items()}
        for image_name, bgr in iter_images(args.check):
            x = preprocess(bgr, hw)
            with torch.no_grad():
                eager = run_eager(x)
            for fmt, exported in loaded.items():
                out = exported(x)
                row = dict(image=image_name, format=fmt, max_abs_diff=max_difference(eager, out))
                row.update(beta_eager=beta_of(eager), beta_exported=beta_of(out))
                detections = ""
                if kind == "detectron2" and "instances" in out[0]:
                    row.update(detections_eager=len(eager[0]["instances"]), detections_exported=len(out[0]["instances"]))
                    flipped, pixels = binary_differences(eager, out)
                    row.update(mask_pixels_differing=flipped, mask_pixels=pixels)
                    detections = (
                        f", detections {row['detections_eager']} / {row['detections_exported']}, "
                        f"mask pixels differing {flipped} of {pixels}"
                    )
                rows.append(row)
                logger.info(
                    f"{image_name:12s} {fmt:11s} max |exported - eager| = {row['max_abs_diff']:.3g}, "
                    f"β eager {row['beta_eager']:.4f}, exported {row['beta_exported']:.4f}{detections}"
                )
    swaps = swap_check(model, example, [preprocess(bgr, hw) for _, bgr in iter_images(args.check)]) if args.swap_check else []
    if args.check:
        with open(os.path.join(args.output, name + "_check.json"), "w") as f:
            json.dump(dict(files=files, input_size=list(hw), checks=rows, swap_checks=swaps), f, indent=2)
    return dict(files=files, checks=rows, swap_checks=swaps, failed=failed)


def swap_check(model, example, images):
    """A torch.export program does not keep the routing it was traced with: trace it with
    every region at φ = 1 (a +30 offset on the finest logits), then load the model's own
    router weights into the program and run it on ``images``; and the reverse. Returns one
    row per direction: the largest difference to eager (outputs and β) and the β per image."""
    from dge.analysis.calibration import set_logit_offset

    if not dge_modules(model):
        raise ValueError("--swap-check needs a model with DGE blocks")
    own = {k: v.clone() for k, v in model.state_dict().items()}
    set_logit_offset(model, [30.0])
    all_fine = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for label, traced, run in (("traced all-fine, run as routed", all_fine, own), ("traced as routed, run all-fine", own, all_fine)):
        model.load_state_dict(traced)
        program = torch.export.export(model, (example,)).module()
        program.load_state_dict(run)
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


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
