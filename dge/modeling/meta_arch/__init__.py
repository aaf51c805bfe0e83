"""Meta-architectures with the DGE budget loss (registered with META_ARCH_REGISTRY)."""
from .budget import BudgetLossMixin, DGERCNN, DGESemanticSegmentor
