"""Gate maps (the paper's Fig. 1 / Fig. 4): which granularity each region chose, per stage,
over the image the model saw."""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..layers import RoutingRecord, dge_stages

__all__ = ["GRANULARITY_COLORS", "stage_gate_maps", "colorize_gates", "render_gate_figure"]

# φ -> RGB, as Fig. 4 (1 red, 2 green, 4 blue); 0 ("skipped") dark grey, 8 yellow.
GRANULARITY_COLORS: Dict[int, Tuple[int, int, int]] = {
    0: (40, 40, 40),
    1: (230, 40, 40),
    2: (40, 200, 60),
    4: (50, 90, 230),
    8: (240, 200, 30),
}


def stage_gate_maps(model: torch.nn.Module, record: RoutingRecord, image_hw: Tuple[int, int]) -> List[Dict]:
    """Per stage (per block where the model has one stage, a plain ViT), from the forward of
    the DGE blocks in ``model`` that ``record`` (``dge.layers.record_routing``) holds:

    ``{"stage": name, "maps": [B, L, Hr, Wr] long (φ per region, one per block),
    "region_px": (h, w) pixels of one region in the input tensor, "granularities": Φ,
    "query_ratio": [B] queries / tokens over the stage's blocks}``.

    Args:
        image_hw: (H, W) of the input tensor the model ran on (after padding).
    """
    groups = dge_stages(model)
    if len(groups) == 1:  # a plain ViT: one panel per block (a majority over all would hide them)
        (layers,) = groups.values()
        groups = {f"block {i}": [entry] for i, entry in enumerate(layers)}
    out = []
    for stage, layers in groups.items():
        routings = [record.of(m) for _, _, m in layers]
        first = layers[0][2]
        h, w = routings[0].hw
        stride = (image_hw[0] / h, image_hw[1] / w)
        region = first.layout((h, w), "cpu").tokens_per_region
        maps = torch.stack([r.granularity_map.cpu() for r in routings], dim=1)
        queries = torch.stack([r.num_queries.float() for r in routings]).sum(0)
        out.append(
            {
                "stage": stage,
                "maps": maps,
                "region_px": (region[0] * stride[0], region[1] * stride[1]),
                "granularities": first.granularities,
                "query_ratio": (queries / (len(routings) * h * w)).cpu(),
            }
        )
    return out


def colorize_gates(gmap: np.ndarray, region_px: Tuple[float, float], out_hw: Tuple[int, int]) -> np.ndarray:
    """[Hr, Wr] φ per region -> [H, W, 3] uint8 colours covering ``out_hw`` pixels."""
    h, w = out_hw
    rows = np.minimum((np.arange(h) / region_px[0]).astype(int), gmap.shape[0] - 1)
    cols = np.minimum((np.arange(w) / region_px[1]).astype(int), gmap.shape[1] - 1)
    lut = np.zeros((max(GRANULARITY_COLORS) + 1, 3), np.uint8)
    for g, color in GRANULARITY_COLORS.items():
        lut[g] = color
    return lut[gmap[rows[:, None], cols[None, :]]]


def majority_map(maps: torch.Tensor) -> np.ndarray:
    """[L, Hr, Wr] -> [Hr, Wr]: the granularity most blocks of a stage chose per region
    (ties go to the finer one)."""
    values = sorted(set(maps.unique().tolist()))
    counts = torch.stack([(maps == g).sum(0) for g in values])  # [G, Hr, Wr]
    return np.array(values)[counts.argmax(0).numpy()]


def render_gate_figure(
    image_rgb: np.ndarray, stages: Sequence[Dict], index: int = 0, alpha: float = 0.45, title: str = ""
):
    """A matplotlib figure: the image, then one overlay per stage (majority φ of its blocks
    per region) with a legend. ``image_rgb`` is [H, W, 3] uint8, the model's input before
    padding; ``index`` selects the image of the batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    h, w = image_rgb.shape[:2]
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3.2 * (len(stages) + 1), 3.2 * h / w + 0.6))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image_rgb)
    axes[0].set_title(title or "input", fontsize=9)
    used = set()
    for ax, st in zip(axes[1:], stages):
        gmap = majority_map(st["maps"][index])
        used |= set(np.unique(gmap).tolist())
        color = colorize_gates(gmap, st["region_px"], (h, w))
        ax.imshow((image_rgb * (1 - alpha) + color * alpha).astype(np.uint8))
        ax.set_title(f"{st['stage']}: {100 * float(st['query_ratio'][index]):.0f}% queries", fontsize=9)
    for ax in axes:
        ax.axis("off")
    handles = [Patch(color=np.array(GRANULARITY_COLORS[g]) / 255.0, label=f"φ={g}") for g in sorted(used)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
