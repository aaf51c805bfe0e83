"""dge's detectron2 front door: everything here needs detectron2 (``pip install dge[detectron2]``
and detectron2 itself, which is not on PyPI). ``import dge`` imports this package when
detectron2 is installed; importing it registers the backbones (BACKBONE_REGISTRY: PVT / DPVT
+ FPN, ViTDet, any timm model + FPN), the budget-loss meta-architectures
(META_ARCH_REGISTRY), the Semantic FPN head (SEM_SEG_HEADS_REGISTRY) and the synthetic
datasets (``dge_synthetic_*``).

* ``backbone``, ``vitdet``, ``timm_backbone``: the backbones; ``meta_arch``: the budget loss
  of Eq. 8 in the training step; ``sem_seg``: the Semantic FPN head;
* ``data``: datasets, checks and loaders; ``engine``: trainer pieces (checkpoints, evaluator,
  optimizer, predictor, logs); ``export``: whole-model export; ``compat``: detectron2 v0.6 and
  current detectron2 alike.

The config keys are declared in ``dge.config`` (``add_dge_config``), their one home.
"""
from . import data  # noqa: F401  (registration: the synthetic datasets)
from .backbone import PVTBackbone, build_pvt_backbone, build_pvt_fpn_backbone
from .export import check_detectron2_format, export_detectron2_model
from .meta_arch import DGERCNN, BudgetLossMixin, DGESemanticSegmentor
from .sem_seg import SemanticFPNHead
from .timm_backbone import TimmBackbone, build_timm_backbone, build_timm_fpn_backbone
from .vitdet import SimpleFeaturePyramid, build_vitdet_backbone

__all__ = [
    "BudgetLossMixin",
    "DGERCNN",
    "DGESemanticSegmentor",
    "PVTBackbone",
    "SemanticFPNHead",
    "TimmBackbone",
    "SimpleFeaturePyramid",
    "build_pvt_backbone",
    "build_pvt_fpn_backbone",
    "build_timm_backbone",
    "build_timm_fpn_backbone",
    "build_vitdet_backbone",
    "check_detectron2_format",
    "export_detectron2_model",
]
