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

import torch

import dge  # noqa: F401  (registration)
from dge.layers.calibration import calibrate, randomize_routers
from dge.analysis.export_checks import check_exports, detectron2_export_source, swap_check, timm_export_source
from dge.config import load_config
from dge.detectron2.data import iter_images
from dge.detectron2.engine import setup_dge_logger
from dge.detectron2.export import check_detectron2_format, export_detectron2_model
from dge.export import FILE_SUFFIXES, FORMATS, ExportError, export_module
from dge.layers import dge_modules

logger = logging.getLogger("dge.export")


def build(args):
    """-> (kind, eager module, preprocess(bgr uint8 [H, W, 3], (H, W)) -> its input, default (H, W))."""
    if args.timm_model:
        return timm_export_source(args.timm_model, args.weights)
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS and not args.random_routers:
        logger.warning("MODEL.WEIGHTS is empty: the model is randomly initialised")
    return detectron2_export_source(cfg, args.what, next(iter_images([args.export_image]))[1])


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

    images = list(iter_images(args.check))
    inputs = [(n, preprocess(bgr, hw)) for n, bgr in images]
    rows = check_exports(files, run_eager, inputs, kind == "detectron2") if images else []
    swaps = swap_check(model, example, [preprocess(bgr, hw) for _, bgr in images]) if args.swap_check else []
    if args.check:
        with open(os.path.join(args.output, name + "_check.json"), "w") as f:
            json.dump(dict(files=files, input_size=list(hw), checks=rows, swap_checks=swaps), f, indent=2)
    return dict(files=files, checks=rows, swap_checks=swaps, failed=failed)


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
