"""Spatial redundancy of the queries of vanilla encoders (Sec. 3.1, Fig. 2).

For each encoder block, its input queries (extra tokens such as the class token left out)
are laid out on their h×w map and split into non-overlapping 2×2 patches; each token is
compared with the mean token of its patch by the Pearson correlation coefficient over the
channels. Fig. 2(a) is the histogram of these coefficients, Fig. 2(c) their per-image mean
varying across images, Fig. 2(b) the accuracy / complexity curve when, in every block,
tokens above a threshold are replaced by their patch mean.

Replacement rule (Fig. 2b; the paper: "in each patch, we replace the tokens with the average
token when their correlation coefficient is above a given threshold"):

- in block l, the k tokens of a patch whose coefficient (measured on block l's actual input,
  i.e. after the replacements of the blocks before it) is > threshold become the patch mean;
  the block then computes one query for all of them: the patch costs ``4 - k + [k > 0]``
  queries (4 when nothing or one token is replaced, 1 when all four are);
- only the queries are replaced: keys and values stay the block's unmodified input (dense
  keys / values, as in DGE); a replaced token's position (for deformable attention) becomes
  the patch centre, and its residual path carries the patch mean;
- tokens of an odd last row / column (no complete patch) and extra tokens are never replaced
  and have no coefficient;
- complexity: ``query_ratio`` = queries computed / spatial tokens, summed over blocks and
  images (the curve's x-axis); ``flops_ratio`` also weighs each block's queries by its
  per-query cost and adds its fixed (key / value) cost and the always-computed extra-token
  queries, with the analytic costs of ``EncoderBlock.complexity`` (Eq. 7 style).

A constant token has no Pearson coefficient; it gets 0 (the denominator is clamped).
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..layers import DynamicGrainedEncoder, EncoderBlock

__all__ = [
    "HIGH",
    "RedundancyProbe",
    "RedundancyStats",
    "count_queries",
    "encoder_blocks",
    "patch_correlation",
    "pearson",
    "replace_by_patch_mean",
    "split_patches",
    "stats_to_dict",
]


# Observation 1 of Sec. 3.1: "most of the correlation coefficients are greater than 0.8".
HIGH = 0.8


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Pearson correlation coefficient of ``a`` and ``b`` (broadcast) along ``dim``, clamped to
    [-1, 1]; 0 where either is constant."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    r = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim)).clamp_min(eps)
    return r.clamp(-1.0, 1.0)


def split_patches(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Spatial tokens [B, h*w, C] (row-major) -> 2×2 patches [B, h//2, w//2, 4, C] (in each
    patch: top-left, top-right, bottom-left, bottom-right); an odd last row / column is left out."""
    b, n, c = tokens.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"expected {h}×{w} = {h * w} spatial tokens; got {n}")
    h2, w2 = h // 2, w // 2
    grid = tokens.reshape(b, h, w, c)[:, : 2 * h2, : 2 * w2]
    return grid.reshape(b, h2, 2, w2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h2, w2, 4, c)


def _merge_patches(patches: torch.Tensor, tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Inverse of ``split_patches``: ``tokens`` [B, h*w, C] with the patched area taken from
    ``patches`` [B, h//2, w//2, 4, C]."""
    b, n, c = tokens.shape
    h, w = hw
    h2, w2 = patches.shape[1:3]
    grid = tokens.reshape(b, h, w, c).clone()
    grid[:, : 2 * h2, : 2 * w2] = patches.reshape(b, h2, w2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(
        b, 2 * h2, 2 * w2, c
    )
    return grid.reshape(b, n, c)


def patch_correlation(tokens: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Spatial tokens [B, h*w, C] -> [B, h//2, w//2, 4]: the Pearson coefficient (over the C
    channels) of each token with the mean token of its 2×2 patch."""
    patches = split_patches(tokens, hw)
    return pearson(patches, patches.mean(dim=3, keepdim=True))


def replace_by_patch_mean(tokens: torch.Tensor, hw: Tuple[int, int], mask: torch.Tensor) -> torch.Tensor:
    """tokens [B, h*w, C] with each token where ``mask`` [B, h//2, w//2, 4] is true replaced by
    the mean of its 2×2 patch (the mean of the patch's original tokens)."""
    patches = split_patches(tokens, hw)
    replaced = torch.where(mask[..., None], patches.mean(dim=3, keepdim=True), patches)
    return _merge_patches(replaced, tokens, hw)


def count_queries(mask: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    """Queries a block computes per image when the tokens where ``mask`` [B, h//2, w//2, 4] is
    true share their patch mean: ``4 - k + [k > 0]`` per patch with k such tokens, plus one per
    token outside the complete patches. Returns [B] (float)."""
    h, w = hw
    k = mask.sum(dim=-1)
    per_patch = 4 - k + (k > 0).to(k.dtype)
    leftover = h * w - 4 * (h // 2) * (w // 2)
    return per_patch.flatten(1).sum(dim=1).float() + leftover


def encoder_blocks(model: nn.Module) -> List[Tuple[str, EncoderBlock]]:
    """The vanilla encoder blocks of ``model`` in forward order, (name, block). Raises
    ValueError for a model with DGE blocks or without encoder blocks."""
    dge = [n for n, m in model.named_modules() if isinstance(m, DynamicGrainedEncoder)]
    if dge:
        raise ValueError(
            f"{type(model).__name__} has {len(dge)} DGE blocks (e.g. {dge[0]!r}); the redundancy analysis "
            "needs a vanilla model (without '_dge')"
        )
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, EncoderBlock)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no dge.layers.EncoderBlock to analyse")
    return blocks


@dataclass
class _Layer:
    name: str
    hw: Tuple[int, int] = (0, 0)  # of the last forward pass
    histogram: Optional[torch.Tensor] = None  # [bins] counts (int64)
    coef_sum: float = 0.0
    coef_count: int = 0
    high: int = 0  # coefficients >= HIGH
    image_means: List[torch.Tensor] = field(default_factory=list)  # [B] per batch
    queries: float = 0.0  # summed over images
    tokens: float = 0.0
    flops: float = 0.0
    static_flops: float = 0.0


@dataclass
class RedundancyStats:
    """What a ``RedundancyProbe`` saw, per block (forward order).

    ``histograms`` [L, bins] counts of coefficients in ``edges`` (bins + 1 values over [-1, 1]);
    ``layer_mean`` / ``share_high`` [L] the mean of all coefficients and the share >= ``HIGH``
    (0.8, the paper's observation 1); ``image_means`` [N, L] each image's mean coefficient per
    block (NaN for a block whose map has no complete 2×2 patch); ``queries`` / ``tokens`` /
    ``flops`` / ``static_flops`` [L] summed over images."""

    names: List[str]
    hw: List[Tuple[int, int]]
    edges: np.ndarray
    histograms: np.ndarray
    layer_mean: np.ndarray
    share_high: np.ndarray
    image_means: np.ndarray
    queries: np.ndarray
    tokens: np.ndarray
    flops: np.ndarray
    static_flops: np.ndarray

    @property
    def num_images(self) -> int:
        return self.image_means.shape[0]

    @property
    def query_ratio(self) -> float:
        return float(self.queries.sum() / self.tokens.sum())

    @property
    def flops_ratio(self) -> float:
        return float(self.flops.sum() / self.static_flops.sum())

    def layer_variance(self) -> np.ndarray:
        """[L] variance over images of the per-image mean coefficient (population variance,
        ddof 0; Fig. 2c)."""
        return np.nanvar(self.image_means, axis=0) if self.num_images else np.full(len(self.names), np.nan)


class RedundancyProbe:
    """Forward pre-hooks on every vanilla encoder block of ``model`` that measure the 2×2-patch
    correlation of the block's input queries and, with a ``threshold``, replace the tokens
    above it by their patch mean (see the module docstring for the exact rule).

    Use as a context manager around forward passes, then ``stats()``::

        with RedundancyProbe(model, threshold=0.9) as probe:
            logits = model(images)
        probe.stats().query_ratio

    Every vanilla block's ``forward_queries`` is probed (the call ``block(x, hw)`` makes).
    """

    def __init__(self, model: nn.Module, threshold: Optional[float] = None, bins: int = 100):
        self.blocks = encoder_blocks(model)
        self.threshold = threshold
        self.bins = bins
        self.layers = [_Layer(name) for name, _ in self.blocks]
        self._handles = []

    def __enter__(self) -> "RedundancyProbe":
        for i, (_, block) in enumerate(self.blocks):
            block.forward_queries = self._probe(i, block.forward_queries)  # an instance override
            self._handles.append(block)
        return self

    def __exit__(self, *exc) -> None:
        for block in self._handles:
            del block.forward_queries
        self._handles = []

    def _probe(self, index: int, forward_queries):
        layer = self.layers[index]
        module = self.blocks[index][1]

        def probed(x, context, hw, centers=None, *rest):
            hw = tuple(hw)
            e = x.shape[1] - hw[0] * hw[1]
            coef = patch_correlation(x[:, e:], hw)  # [B, h2, w2, 4]
            mask = None if self.threshold is None else coef > self.threshold
            queries = x.shape[0] * hw[0] * hw[1] if mask is None else count_queries(mask, hw).sum().item()
            self._record(layer, module, coef, hw, e, queries)
            if mask is not None and bool(mask.any()):
                x = torch.cat([x[:, :e], replace_by_patch_mean(x[:, e:], hw, mask)], dim=1)
                if centers is not None:
                    centers = torch.cat([centers[:, :e], replace_by_patch_mean(centers[:, e:], hw, mask)], dim=1)
            return forward_queries(x, context, hw, centers, *rest)

        return probed

    def _record(
        self, layer: _Layer, block: EncoderBlock, coef: torch.Tensor, hw: Tuple[int, int], e: int, queries: float
    ) -> None:
        b = coef.shape[0]
        layer.hw = hw
        hist = torch.histc(coef.detach().float().cpu(), bins=self.bins, min=-1.0, max=1.0).long()  # exact counts
        layer.histogram = hist if layer.histogram is None else layer.histogram + hist
        layer.coef_sum += coef.sum().item()
        layer.coef_count += coef.numel()
        layer.high += int((coef >= HIGH).sum())
        if coef[0].numel():
            layer.image_means.append(coef.detach().float().flatten(1).mean(dim=1).cpu())
        else:
            layer.image_means.append(torch.full((b,), float("nan")))
        n = hw[0] * hw[1]
        layer.tokens += float(b * n)
        layer.queries += float(queries)
        fixed, per_query = block.complexity(hw, e)  # extra-token queries are always computed
        layer.flops += b * (fixed + per_query * e) + per_query * queries
        layer.static_flops += b * (fixed + per_query * (n + e))

    def stats(self) -> RedundancyStats:
        """The statistics of all forward passes so far. Raises RuntimeError before any."""
        missing = [l.name for l in self.layers if l.histogram is None]
        if missing:
            raise RuntimeError(f"no forward pass reached the blocks {missing[:3]}")
        return RedundancyStats(
            names=[l.name for l in self.layers],
            hw=[l.hw for l in self.layers],
            edges=np.linspace(-1.0, 1.0, self.bins + 1),
            histograms=torch.stack([l.histogram for l in self.layers]).numpy().astype(np.int64),
            layer_mean=np.array([l.coef_sum / l.coef_count if l.coef_count else np.nan for l in self.layers]),
            share_high=np.array([l.high / l.coef_count if l.coef_count else np.nan for l in self.layers]),
            image_means=torch.stack([torch.cat(l.image_means) for l in self.layers], dim=1).numpy(),
            queries=np.array([l.queries for l in self.layers]),
            tokens=np.array([l.tokens for l in self.layers]),
            flops=np.array([l.flops for l in self.layers]),
            static_flops=np.array([l.static_flops for l in self.layers]),
        )


def stats_to_dict(stats: RedundancyStats, names: Optional[Sequence[str]] = None) -> Dict:
    """The numbers behind Fig. 2(a) and 2(c), JSON-ready."""
    variance = stats.layer_variance()
    per_layer = []
    for i, name in enumerate(stats.names):
        per_layer.append(
            {
                "layer": i + 1,
                "name": name,
                "hw": list(stats.hw[i]),
                "mean": _num(stats.layer_mean[i]),
                "variance_across_images": _num(variance[i]),
                "mean_of_image_means": _num(np.nanmean(stats.image_means[:, i])) if stats.num_images else None,
                "share_above_0.8": _num(stats.share_high[i]),
                "histogram": stats.histograms[i].tolist(),
            }
        )
    pooled = stats.histograms.sum(axis=0)
    counts = stats.histograms.sum(axis=1)
    out = {
        "num_images": stats.num_images,
        "bin_edges": [round(float(v), 6) for v in stats.edges],
        "pooled_histogram": pooled.tolist(),
        "pooled_share_above_0.8": _num(np.nansum(stats.share_high * counts) / max(counts.sum(), 1)),
        "layers": per_layer,
    }
    if names is not None:
        out["image_means"] = {n: [_num(v) for v in row] for n, row in zip(names, stats.image_means)}
    return out


def _num(v) -> Optional[float]:
    v = float(v)
    return None if np.isnan(v) else v
