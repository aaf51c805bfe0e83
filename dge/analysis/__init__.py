"""Analysis of dge models: per-image FLOPs with fvcore (``flops``) and gate maps (``gates``)."""
from .flop_count import FlopCountAnalysis
from .flops import (
    ImageFlops,
    LayerFlops,
    analyze_image,
    analyze_images,
    flops_summary,
    force_granularity,
    format_flops_report,
)
from .gates import GRANULARITY_COLORS, colorize_gates, render_gate_figure, stage_gate_maps

__all__ = [
    "FlopCountAnalysis",
    "ImageFlops",
    "LayerFlops",
    "analyze_image",
    "analyze_images",
    "flops_summary",
    "force_granularity",
    "format_flops_report",
    "GRANULARITY_COLORS",
    "colorize_gates",
    "render_gate_figure",
    "stage_gate_maps",
]
