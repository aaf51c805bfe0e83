"""Models: backbones (registered with detectron2's BACKBONE_REGISTRY and timm) and the
budget-loss meta-architectures (META_ARCH_REGISTRY)."""
from . import backbone  # noqa: F401  (registration)
from . import meta_arch  # noqa: F401  (registration)
