#!/usr/bin/env python
"""Convert ImageNet checkpoints to this project's parameter names, for detectron2
(MODEL.WEIGHTS) or timm.

Sources: official PVT v1 classification checkpoints (whai362/PVT: pvt_tiny.pth ...
pvt_large.pth), vtpack's PVT / PVT+DGE / DPVT / DeiT(+DGE) checkpoints and timm / official
DeiT checkpoints (their fused ``attn.qkv`` is split into ``attn.q`` and ``attn.kv``); timm
ViT checkpoints (MAE, DeiT III, DINOv2) for a ViTDet config's plain ViT; any timm model's
checkpoint (timm's files or the authors' releases of Swin, PVT v2, Hiera ...) for a config of
the timm backbone, through the model module's own ``checkpoint_filter_fn``.

    # detectron2: the bottom-up backbone of a config (its position-embedding grid, Φ, ...)
    python tools/convert_pretrained.py pvt_small.pth pvt_small_d2.pth --config-file configs/mask_rcnn_pvt_s_1x.yaml
    # detectron2 or timm, for a timm model name
    python tools/convert_pretrained.py pvt_small.pth pvt_small_d2.pth --model pvt_small_dge --format d2
    python tools/convert_pretrained.py deit_small.pth deit_small_dge.pth --model deit_small_dge --format timm
    # detectron2: a timm ViT-B (e.g. MAE's) for the ViTDet-style Mask R-CNN
    python tools/convert_pretrained.py mae_base.pth vitdet_b_d2.pth --config-file configs/mask_rcnn_vitdet_b_dge_1x.yaml
    # detectron2: Swin-T (timm's file or Microsoft's swin_tiny_patch4_window7_224.pth) for the timm backbone
    python tools/convert_pretrained.py swin_tiny.pth swin_t_d2.pth --config-file configs/mask_rcnn_swin_t_dge_1x.yaml

Keys the target does not use (classifier, class token of a detection backbone, ...) are
listed with the reason; keys the target lacks or the checkpoint lacks are listed and make
the conversion fail (exit 1) unless ``--allow-mismatch``. Routers missing from a vanilla
checkpoint are left out of the file, so the DGE model keeps their initial values: the log
says so, and so does detectron2's checkpointer when it loads the file.
"""
import argparse
import logging
import math
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch
import timm
from torch import nn

import dge  # noqa: F401  (registers the timm models pvt_*, dpvt_*, deit_*)
from dge.detectron2 import backbone as d2, timm_backbone, vitdet
from dge.models import convert, convert_timm_state_dict
from dge.detectron2.engine import setup_dge_logger

logger = logging.getLogger("dge.convert_pretrained")


def checkpoint_img_size(state_dict, family: str) -> Optional[int]:
    """Input size the checkpoint's position embeddings were trained for (square grids)."""
    if family == "deit":
        pos = state_dict.get("pos_embed")
        stride, extra = 16, 1
    else:
        pos = state_dict.get("pos_embed1", state_dict.get("stages.0.pos_embed"))
        stride, extra = 4, 0
    if pos is None:
        return None
    side = math.isqrt(pos.shape[1] - extra)
    return side * stride if side * side == pos.shape[1] - extra else None


def build_target(args, state_dict) -> Tuple[nn.Module, str]:
    """The model whose names the checkpoint is converted to, and its family ("pvt" or "deit")."""
    if args.config_file:
        from detectron2.layers import ShapeSpec

        from dge.config import load_config

        cfg = load_config(args.config_file, args.opts)
        if cfg.MODEL.BACKBONE.NAME == "build_vitdet_backbone":
            return vitdet.vit_from_config(cfg), "vitdet"
        if cfg.MODEL.BACKBONE.NAME in ("build_timm_backbone", "build_timm_fpn_backbone"):
            return timm_backbone.build_timm_backbone(cfg, ShapeSpec(channels=3)).model, "timm"
        return d2.build_pvt_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))), "pvt"
    name = args.model
    family = "deit" if name.startswith("deit") else "pvt"
    if not (name.startswith(("pvt_", "dpvt_", "deit_")) and name in timm.list_models()):
        raise SystemExit(f"--model must be one of this project's timm models (pvt_*, dpvt_*, deit_*); got {name!r}")
    img_size = args.img_size or checkpoint_img_size(state_dict, family) or 256
    if args.format == "d2":
        if family == "deit":
            raise SystemExit("--format d2 needs a PVT / DPVT model: DeiT has no detectron2 backbone here")
        model = timm.create_model(name, num_classes=0, global_pool="avg", img_size=img_size)
        return d2.PVTBackbone(model), family
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    return timm.create_model(name, num_classes=num_classes, img_size=img_size), family


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint to convert (.pth)")
    parser.add_argument("output", help="file to write (.pth)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--config-file", help="detectron2 config: convert for its backbone (PVT / DPVT, ViTDet, timm; DGE or not)"
    )
    target.add_argument("--model", help="timm model name, e.g. pvt_small, pvt_small_dge, dpvt_small, deit_small_dge")
    parser.add_argument("--format", choices=("d2", "timm"), default="d2", help="output layout (default d2)")
    parser.add_argument(
        "--img-size", type=int, help="input size of the target's position-embedding grid (default: the checkpoint's)"
    )
    parser.add_argument(
        "--prefix", default="backbone.bottom_up.",
        help="key prefix of d2 files (default: the FPN's or simple pyramid's bottom_up; a timm backbone adds model.)",
    )
    parser.add_argument(
        "--allow-mismatch", action="store_true", help="write the file despite missing / unexpected keys"
    )
    parser.add_argument("opts", nargs="*", help="config overrides (KEY VALUE ...) with --config-file")
    args = parser.parse_intermixed_args(argv)
    if args.config_file and args.format != "d2":
        parser.error("--config-file converts for detectron2: use --format d2")

    state_dict = convert.unwrap_checkpoint(torch.load(args.source, map_location="cpu", weights_only=True))
    model, family = build_target(args, state_dict)
    convert_fn = {"deit": convert.convert_deit_state_dict, "vitdet": convert.convert_vitdet_state_dict,
                  "timm": convert_timm_state_dict}.get(family, convert.convert_pvt_state_dict)
    try:
        conversion = convert_fn(state_dict, model)
    except ValueError as e:
        logger.error(f"{args.source}: {e}")
        return 1
    conversion.log(logger)
    other_missing = conversion.unexplained_missing
    if (conversion.unexpected or other_missing) and not args.allow_mismatch:
        logger.error(
            f"not written: {len(other_missing)} missing and {len(conversion.unexpected)} unexpected keys "
            "(listed above); --allow-mismatch writes the file anyway"
        )
        return 1
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "d2":
        prefix = args.prefix + ("model." if family == "timm" else "")  # TimmBackbone keeps the timm model as .model
        payload = {
            "model": {prefix + k: v for k, v in conversion.state_dict.items()},
            "__author__": f"dge tools/convert_pretrained.py ({conversion.source})",
            "matching_heuristics": False,
        }
    else:
        payload = conversion.state_dict
    torch.save(payload, out)
    logger.info(f"wrote {out} ({args.format}, {len(conversion.state_dict)} tensors)")
    return 0


if __name__ == "__main__":
    setup_dge_logger()
    sys.exit(main())
