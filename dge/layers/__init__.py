"""Model-agnostic DGE parts: router, grained pooling, the encoder wrapper, complexity
accounting and the attention kinds of the vanilla blocks."""
from .attention import DeformableAttention, SpatialReductionAttention
from .block import EncoderBlock, Mlp
from .complexity import ComplexityReport, budget_loss, complexity_report, dge_modules, dge_stages, routing_stats
from .encoder import DynamicGrainedEncoder, RoutingInfo, is_capturing, specialize_to_input
from .grained import QueryRows, token_centers
from .router import GrainedRouter
