"""The attention kernels DGE's blocks call: SDPA on padded segments of packed query rows,
flash attention over variable-length sequences on a GPU, and row tiles at CPU inference.

Kernels on a CUDA GPU: a DGE block's query count changes with every image and every training
step. Attention runs on flash / memory-efficient kernels, which take any sequence length as
it comes; cuDNN's attention (which torch >= 2.14 prefers on sm90 / sm100) builds and caches an
execution plan per exact shape, so it is used only when ``DGE_CUDNN_ATTENTION=1`` is set.
"""
import contextlib
import functools
import logging
import os
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .rows import QueryRows

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: segment padding everywhere (logged once, on a GPU)
    varlen_attn = None

__all__ = [
    "inference_tiles",
    "packed_attention_available",
    "cudnn_attention_allowed",
    "sdpa",
    "attend",
    "sdpa_kernels",
    "packed_attention",
    "attention_backends",
]

logger = logging.getLogger(__name__)
TILE_ELEMENTS = 1 << 20  # values per inference tile (4 MB in float32): fits the caches
CUDNN_ATTENTION_ENV = "DGE_CUDNN_ATTENTION"  # "1": let SDPA and varlen_attn choose cuDNN


def inference_tiles(module: nn.Module, rows: int, elements_per_row: int, device: torch.device) -> int:
    """Rows per tile when ``module`` should run ``rows`` rows in tiles of ``TILE_ELEMENTS``
    intermediate values, else 0. Tiles are used on the CPU at inference only (eval mode, no
    autograd, not traced), and only when there are more than two: a tile's intermediate then
    stays in cache instead of making a round trip through memory, and no huge buffer is
    allocated per call (glibc maps and zero-fills every allocation above 32 MB). A GPU runs
    the whole matrix in one kernel."""
    if device.type != "cpu" or module.training or torch.is_grad_enabled():
        return 0
    if torch.jit.is_tracing() or torch.compiler.is_compiling():  # a graph: no loop over a dynamic size
        return 0
    tile = max(1, TILE_ELEMENTS // max(1, elements_per_row))
    return tile if rows > 2 * tile else 0


def cudnn_attention_allowed() -> bool:
    """Whether DGE's attention may run on cuDNN (``DGE_CUDNN_ATTENTION=1``): one execution
    plan per query count, built on first use and kept, so only for fixed-size workloads."""
    return os.environ.get(CUDNN_ATTENTION_ENV, "0") == "1"


def sdpa_kernels(device: torch.device):
    """The context in which DGE calls SDPA on ``device``: on CUDA the enabled backends but
    cuDNN (flash first, then memory-efficient, math as the last resort) unless allowed;
    elsewhere torch's own choice."""
    if device.type != "cuda" or cudnn_attention_allowed() or not torch.backends.cuda.cudnn_sdp_enabled():
        return contextlib.nullcontext()
    enabled = [
        (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()),
        (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
        (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()),
    ]
    return sdpa_kernel([backend for backend, on in enabled if on])


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0, bias=None, scale=None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on [B, heads, M, d] queries in ``sdpa_kernels``;
    ``bias``: an additive [B, heads, M, K] mask (relative positions) or None; ``scale``: the
    logits' scale (None: 1/√d)."""
    with sdpa_kernels(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)


@functools.lru_cache(maxsize=None)
def _flash_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)  # flash attention: Ampere and newer


@functools.lru_cache(maxsize=1)
def _log_no_varlen() -> None:
    logger.info(
        "torch %s has no torch.nn.attention.varlen (torch >= 2.10): packed query rows are padded "
        "per segment for scaled_dot_product_attention on the GPU",
        torch.__version__,
    )


def packed_attention_available(q: torch.Tensor, head_dim: int, dropout: float) -> bool:
    """Whether attention over packed rows runs as ``varlen_attn`` (flash attention over
    variable-length sequences, torch >= 2.10): a CUDA device of compute capability 8.0 or
    newer, float16 / bfloat16 queries (e.g. under autocast), a head size that is a multiple
    of 8 up to 256, no attention dropout, and eager execution. Elsewhere the rows are padded
    per segment (``QueryRows.segments``) for SDPA."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim % 8 or head_dim > 256 or dropout > 0.0:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if varlen_attn is None:
        _log_no_varlen()
        return False
    return _flash_capable(q.device.index if q.device.index is not None else torch.cuda.current_device())


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: QueryRows) -> torch.Tensor:
    """Packed rows q [T, heads, d] of B images against each image's keys k, v [B, heads, Nk, d]
    in one flash-attention call over variable-length sequences: no padding, no mask, no host
    read (``max_q`` is the bound ``rows.max_rows``). A window of Nk keys on each side covers
    every key: flash attention treats it as full attention, and torch's ``varlen_attn`` then
    never takes its cuDNN route (a plan per shape); (-1, -1), torch's default, when cuDNN is
    allowed."""
    b, heads, nk, d = k.shape
    k, v = (t.transpose(1, 2).reshape(b * nk, heads, d) for t in (k, v))
    cu_q = torch.cat([rows.counts.new_zeros(1), torch.cumsum(rows.counts, 0)]).to(torch.int32)
    cu_k = torch.arange(0, (b + 1) * nk, nk, device=k.device, dtype=torch.int32)
    window = (-1, -1) if cudnn_attention_allowed() else (nk, nk)
    return varlen_attn(q, k, v, cu_q, cu_k, rows.max_rows, nk, window_size=window)


def attention_backends(device: torch.device, head_dim: int = 64, length: int = 1000) -> Dict[str, str]:
    """The kernels DGE's attention takes on ``device`` for a [1, 1, length, head_dim] SDPA call
    in float32, float16 and bfloat16, and for packed rows in half precision."""
    device = torch.device(device)
    found = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        q = torch.zeros(1, 1, length, head_dim, device=device, dtype=dtype)
        with sdpa_kernels(device):
            choice = SDPBackend(torch._fused_sdp_choice(q, q, q)).name if device.type == "cuda" else "cpu kernel"
        found[f"sdpa {str(dtype).replace('torch.', '')}"] = choice
    packed = packed_attention_available(q[0].half(), head_dim, 0.0)
    route = "torch's choice" if cudnn_attention_allowed() else "flash"
    found["packed rows fp16/bf16"] = f"varlen_attn, {route}" if packed else "padded segments, sdpa"
    return found


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: Optional[QueryRows], dropout: float = 0.0):
    """Attention of queries q [B, heads, M, d] to keys, values [B', heads, Nk, d] -> [B, M,
    heads * d]. With ``rows`` the queries are B' images' packed rows (B = 1): on a CUDA GPU in
    half precision one ``varlen_attn`` call, elsewhere padded per segment of one image's rows,
    each segment against its image's keys."""
    b, heads, m, d = q.shape
    if rows is not None and packed_attention_available(q, d, dropout):
        x = packed_attention(q.transpose(1, 2).reshape(-1, heads, d), k, v, rows)
        return x.view(b, m, heads * d)
    if rows is None:
        return sdpa(q, k, v, dropout).transpose(1, 2).reshape(b, m, heads * d)
    segments, images = rows.segments()  # each segment gets its image's keys
    q = segments.pad(q.transpose(1, 2).reshape(-1, heads * d))
    if images is not None:
        k, v = k.index_select(0, images), v.index_select(0, images)
    s, n = q.shape[:2]
    x = sdpa(q.view(s, n, heads, d).transpose(1, 2), k, v, dropout).transpose(1, 2).reshape(s, n, heads * d)
    return segments.unpad(x).view(b, m, heads * d)
