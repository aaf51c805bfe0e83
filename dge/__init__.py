"""dge: the Dynamic Grained Encoder (NeurIPS 2021) for detectron2 and timm.

``import dge`` registers every backbone, meta-architecture, dataset and timm model.
"""
from . import data as _data  # noqa: F401  (registration: the synthetic datasets)
from . import modeling as _modeling  # noqa: F401  (registration: backbones, meta-archs, timm models)
from .config import add_dge_config

__all__ = ["add_dge_config"]
