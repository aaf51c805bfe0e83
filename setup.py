#!/usr/bin/env python
"""dge: the Dynamic Grained Encoder for vision transformers, in timm and detectron2.

``pip install .`` installs the core, which needs torch, timm and numpy only: ``dge.patch`` on
your timm models, the DGE layer, the PVT / DPVT / DeiT models. The extras add the rest:
``[detectron2]`` what the detectron2 front door (``train_net.py``, the configs, the tools)
needs beside detectron2 itself (not on PyPI: tools/setup/build_detectron2.py builds v0.6,
or build it from its sources), ``[analysis]`` FLOP counts and figures, ``[export]`` ONNX
files, ONNX Runtime and OpenVINO, ``[test]`` the suite, ``[all]`` every one. ``requirements.txt`` is
the pinned set that ``tools/setup/setup_env.sh`` (the README's set-up) installs.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "(.+)"', (HERE / "dge" / "__init__.py").read_text()).group(1)

EXTRAS = {
    "detectron2": [
        "torchvision", "fvcore", "iopath", "pycocotools", "opencv-python-headless", "scikit-image", "Pillow",
        "matplotlib", "PyYAML", "tensorboard", "tqdm", "tabulate",
    ],
    "analysis": ["fvcore", "matplotlib", "PyYAML", "tqdm"],
    "export": ["onnx", "onnxscript", "onnxruntime", "openvino"],
}
EXTRAS["test"] = sorted({"pytest", "pytest-xdist", *EXTRAS["detectron2"], *EXTRAS["analysis"], *EXTRAS["export"]})
EXTRAS["all"] = sorted({r for extra in EXTRAS.values() for r in extra})

METADATA = dict(
    name="dge",
    version=VERSION,
    description="Dynamic Grained Encoder for Vision Transformers (NeurIPS 2021): sparse queries for timm and "
    "detectron2 backbones",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    project_urls={
        "Official code of the paper (vtpack)": "https://github.com/StevenGrove/vtpack",
        "detectron2": "https://github.com/facebookresearch/detectron2",
        "timm": "https://github.com/huggingface/pytorch-image-models",
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["dge", "dge.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.3",  # torch.nn.attention.sdpa_kernel, torch.compiler.is_compiling; tested: 2.11, 2.14
        "timm>=1.0.16",  # PVT v2 forward_intermediates (the timm backbone)
        "numpy",
    ],
    extras_require=EXTRAS,
)

if __name__ == "__main__":
    setup(**METADATA)
