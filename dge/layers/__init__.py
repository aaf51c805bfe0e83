"""The DGE layer, model-agnostic (torch and timm only): the block protocol, the router,
grained pooling and packed query rows, the encoder wrapper, complexity accounting and the
budget loss, routing records, inference budgets, and dge's own vanilla block with its
attention kinds."""
from .attention import (
    ATTENTION_KINDS,
    QKV_BIAS,
    SR_NORM_EPS,
    DeformableAttention,
    SpatialReductionAttention,
    create_attention,
    register_attention,
)
from .block import NORM_EPS, EncoderBlock, Mlp
from .complexity import (
    BudgetLoss,
    ComplexityReport,
    beta_range,
    budget_loss,
    complexity_report,
    dge_modules,
    dge_stages,
    force_granularity,
    routing_stats,
)
from .encoder import DynamicGrainedEncoder, is_capturing, specialize_to_input
from .grained import token_centers
from .inference_budget import check_budget, set_budget_offsets, store_budget, stored_budgets, use_budget
from .keys import is_dge_state, map_block_keys, map_dge_keys
from .options import DGEOptions
from .protocol import BlockCall, BlockCost, DGEBlock
from .router import MAX_BUDGETS, GrainedRouter
from .routing import RoutingInfo, RoutingRecord, record_routing
from .rows import QueryRows
from .saved_options import allow_other_options
