"""Analysis of dge models (needs fvcore and detectron2; matplotlib to draw): per-image FLOPs with
fvcore (``flop_count``, ``flops``, ``flops_report``), gate maps (``gates``), latency and memory
(``latency``, ``benchmark``), host reads (``syncs``), redundancy probes and plots. Router
calibration is in the core: ``dge.layers.calibration``."""
from .flop_count import FlopCountAnalysis
from .flops import ImageFlops, LayerFlops, analyze_image, analyze_images, force_granularity
from .flops_report import flops_summary, format_flops_report
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
