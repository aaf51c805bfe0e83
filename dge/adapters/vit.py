"""timm's ``Block`` with its fused-qkv ``Attention``: ViT, DeiT III, MAE, DINOv2 (registers,
layer scale, q/k norms). Queries take the q rows of ``qkv``, the dense context the k and v
rows; then timm's q / k norms, attention, projection, layer scales and MLP."""
from typing import Tuple

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block

from dge.layers import BlockCost
from dge.layers.kernels import attend

from .base import TimmAdapter, global_attention_cost, project_qkv, register_adapter, split_heads

__all__ = ["ViTAdapter"]


@register_adapter
class ViTAdapter(TimmAdapter):
    block_type = Block
    attention_type = Attention
    family = "timm's Block with its fused-qkv Attention (ViT, DeiT III, MAE, DINOv2)"

    def _attention(self, queries, context, hw, centers, rows) -> torch.Tensor:
        attn = self.attn
        q, k, v = split_heads(attn, *project_qkv(attn, queries, context))
        x = attend(q, k, v, rows, attn.attn_drop.p if self.training else 0.0)
        return attn.proj_drop(attn.proj(attn.norm(x)))

    def complexity(self, hw: Tuple[int, int], num_extra: int = 0) -> BlockCost:
        return global_attention_cost(self, hw, num_extra)
