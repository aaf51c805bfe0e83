#!/usr/bin/env python
"""dge: Dynamic Grained Encoder for vision transformers, as a detectron2 project.

Into an environment that has torch, torchvision and detectron2 (v0.6 or built from source):
``pip install -e .`` installs what the package and its tools import, ``pip install -e .[test]``
also what the test suite needs. ``requirements.txt`` is the pinned set that
``tools/setup/setup_env.sh`` (the README's set-up) installs.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "(.+)"', (Path(__file__).parent / "dge" / "__init__.py").read_text()).group(1)

setup(
    name="dge",
    version=VERSION,
    description="Dynamic Grained Encoder for Vision Transformers (detectron2 + timm)",
    license="Apache-2.0",
    packages=find_packages(include=["dge", "dge.*"]),
    python_requires=">=3.9",
    # detectron2 is not on PyPI as a current build: tools/setup/build_detectron2.py (v0.6) or
    # its sources (https://github.com/facebookresearch/detectron2) install it.
    install_requires=[
        "torch>=2.3",  # torch.nn.attention.sdpa_kernel, torch.compiler.is_compiling; tested: 2.11, 2.14
        "torchvision",
        "numpy",
        "PyYAML",
        "fvcore",
        "iopath",
        "timm>=1.0.9",
        "pycocotools",
        "matplotlib",
        "opencv-python-headless",
        "scikit-image",
        "scipy",
        "Pillow",
        "tensorboard",
        "tqdm",
        "tabulate",
    ],
    extras_require={
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "test": ["pytest", "onnx", "onnxscript", "onnxruntime"],
    },
)
