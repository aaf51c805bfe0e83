#!/usr/bin/env python
"""Train and evaluate DGE classifiers (PVT, DPVT, DeiT) on an ImageNet-style folder.

    python tools/train_classifier.py --data-path datasets/imagenet --model pvt_small_dge
    torchrun --nproc_per_node 8 tools/train_classifier.py --data-path datasets/imagenet ...
    python tools/train_classifier.py --data-path ... --eval-only --resume output/classification/best.pth

``--help`` lists the recipe (the paper's defaults) and the ablation switches.
"""


from dge.classification import parse_args, run
from dge.detectron2.engine import setup_dge_logger


def main(argv=None):
    setup_dge_logger()
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
