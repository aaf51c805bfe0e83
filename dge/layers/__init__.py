"""Model-agnostic DGE parts: router, grained pooling, the encoder wrapper, complexity
accounting and the attention kinds of the vanilla blocks."""
from .attention import QKV_BIAS, SR_NORM_EPS, DeformableAttention, SpatialReductionAttention
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
from .encoder import DGEOptions, DynamicGrainedEncoder, is_capturing, specialize_to_input
from .grained import QueryRows, token_centers
from .keys import is_router_state, map_block_keys, map_dge_keys
from .inference_budget import check_budget, set_budget_offsets, store_budget, stored_budgets, use_budget
from .router import MAX_BUDGETS, GrainedRouter
from .routing import RoutingInfo, RoutingRecord, record_routing
