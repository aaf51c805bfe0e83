#!/usr/bin/env python
"""Run one of detectron2's own tools on dge configs and models.

    python tools/detectron2_tool.py /path/to/detectron2/tools/analyze_model.py \\
        --config-file configs/demo_pvt_dge_synthetic.yaml --tasks activation --num-inputs 2
    python tools/detectron2_tool.py /path/to/detectron2/tools/deploy/export_model.py \\
        --config-file configs/demo_pvt_dge_synthetic.yaml --export-method tracing --format torchscript \\
        --output output/d2_export MODEL.WEIGHTS output/demo/model_final.pth MODEL.DEVICE cpu

The tool runs as its own ``__main__`` after ``import dge`` (which registers the backbones,
meta-architectures and datasets) and with ``detectron2.config.get_cfg`` returning a config
that has dge's keys, so that ``--config-file`` takes dge's configs.
"""
import runpy
import sys

import detectron2.config

import dge  # noqa: F401  (registration)
from dge.config import add_dge_config


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        sys.exit("usage: tools/detectron2_tool.py DETECTRON2_TOOL.py [its arguments]")
    get_cfg = detectron2.config.get_cfg
    detectron2.config.get_cfg = lambda: add_dge_config(get_cfg())
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
