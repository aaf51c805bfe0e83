#!/usr/bin/env python
"""dge: Dynamic Grained Encoder for vision transformers, as a detectron2 project.

The environment (torch, detectron2 without compiled ops, pinned requirements) is made by
``tools/setup/setup_env.sh``; ``pip install -e .`` then only installs this package.
"""
from setuptools import find_packages, setup

setup(
    name="dge",
    version="0.1.0",
    description="Dynamic Grained Encoder for Vision Transformers (detectron2 + timm)",
    packages=find_packages(include=["dge", "dge.*"]),
    python_requires=">=3.9",
    # detectron2 is not on PyPI: tools/setup/build_detectron2.py installs it.
    install_requires=["torch", "torchvision", "fvcore", "timm", "pycocotools", "matplotlib"],
)
