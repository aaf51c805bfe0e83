"""Models: backbones (registered with detectron2's BACKBONE_REGISTRY and timm), the
budget-loss meta-architectures (META_ARCH_REGISTRY) and the Semantic FPN head
(SEM_SEG_HEADS_REGISTRY)."""
from . import backbone  # noqa: F401  (registration)
from . import meta_arch  # noqa: F401  (registration)
from . import sem_seg  # noqa: F401  (registration)
from . import timm_patch  # noqa: F401  (dge.patch / dge.unpatch)
