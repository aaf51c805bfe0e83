"""Reports of per-image FLOPs (``dge.analysis.flops.analyze_images``): statistics over images
(the paper's Fig. 5c) and the text report of tools/analyze_model.py."""
from collections import Counter
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .flop_count import CATEGORIES
from .flops import ImageFlops

__all__ = ["flops_summary", "format_flops_report"]


def _stats(values: Sequence[float]) -> Dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def flops_summary(images: Sequence[ImageFlops]) -> Dict[str, Any]:
    """Statistics over images (GFLOPs; β and ratios as fractions): mean, std, min and max of
    the total, static total, ratio and β, and per stage / per DGE block (the paper's Fig. 5c)."""
    if not images:
        raise ValueError("no images to summarise")
    first = images[0]
    summary: Dict[str, Any] = {
        "num_images": len(images),
        "gflops": _stats([im.total / 1e9 for im in images]),
        "static_gflops": _stats([im.static_total / 1e9 for im in images]),
        "ratio": _stats([im.ratio for im in images]),
        "by_module_gflops": {
            k: {
                "dynamic": _stats([im.by_module.get(k, (0.0, 0.0))[0] / 1e9 for im in images]),
                "static": _stats([im.by_module.get(k, (0.0, 0.0))[1] / 1e9 for im in images]),
            }
            for k in dict.fromkeys(k for im in images for k in im.by_module)
        },
    }
    ops = sorted(set().union(*(im.by_operator.keys() | im.static_by_operator.keys() for im in images)))
    summary["by_operator_gflops"] = {
        op: {
            "dynamic": _stats([im.by_operator.get(op, 0) / 1e9 for im in images]),
            "static": _stats([im.static_by_operator.get(op, 0) / 1e9 for im in images]),
        }
        for op in ops
    }
    if first.layers:
        summary["beta"] = _stats([im.beta for im in images])
        summary["beta_analytic"] = _stats([im.beta_analytic for im in images])
        stages = first.stage_betas().keys()
        summary["stages"] = {
            s: {
                "beta": _stats([im.stage_betas()[s][0] for im in images]),
                "beta_analytic": _stats([im.stage_betas()[s][1] for im in images]),
            }
            for s in stages
        }
        summary["layers"] = [
            {
                "name": l.name,
                "stage": l.stage,
                "gflops": _stats([im.layers[i].counted / 1e9 for im in images]),
                "analytic_gflops": _stats([im.layers[i].analytic / 1e9 for im in images]),
                "static_gflops": _stats([im.layers[i].counted_static / 1e9 for im in images]),
                "analytic_static_gflops": _stats([im.layers[i].analytic_static / 1e9 for im in images]),
                "beta": _stats([im.layers[i].beta for im in images]),
                "beta_analytic": _stats([im.layers[i].beta_analytic for im in images]),
            }
            for i, l in enumerate(first.layers)
        ]
    zero: Dict[str, Counter] = {c: Counter() for c in CATEGORIES}
    unsupported: Counter = Counter()
    for im in images:
        for c, ops in im.zero_flop_ops.items():
            zero[c].update(ops)
        unsupported.update(im.unsupported_ops)
    summary["zero_flop_ops"] = {c: dict(v) for c, v in zero.items()}
    summary["unsupported_ops"] = dict(unsupported)
    return summary


def _fmt(s: Dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    return (
        f"{s['mean'] * scale:.{digits}f} ± {s['std'] * scale:.{digits}f} "
        f"(min {s['min'] * scale:.{digits}f}, max {s['max'] * scale:.{digits}f})"
    )


def _unit(flops: float) -> Tuple[float, str]:
    """(factor from GFLOPs, unit) that shows ``flops`` with a few digits before the point."""
    for factor, unit in ((1.0, "G"), (1e3, "M"), (1e6, "K")):
        if flops * factor >= 1e9:
            return factor, unit
    return 1e9, ""


def _per_block_lines(summary: Dict, k: float, unit: str) -> List[str]:
    lines = [
        f"Per DGE block (mean over images): {unit}FLOPs fvcore vs analytic, dynamic and static; β",
        f"  {'block':<44} {'fvcore':>8} {'Eq.7':>8} {'static':>8} {'Eq.7 st':>8} {'β fvcore':>15} {'β Eq.7':>7}",
    ]
    for layer in summary["layers"]:
        lines.append(
            f"  {layer['name'] or '(model)':<44} {layer['gflops']['mean'] * k:>8.3f} "
            f"{layer['analytic_gflops']['mean'] * k:>8.3f} "
            f"{layer['static_gflops']['mean'] * k:>8.3f} {layer['analytic_static_gflops']['mean'] * k:>8.3f} "
            f"{layer['beta']['mean']:>7.3f} ± {layer['beta']['std']:.3f} {layer['beta_analytic']['mean']:>7.3f}"
        )
    return lines


def format_flops_report(images: Sequence[ImageFlops], per_layer: bool = True) -> str:
    """The text report: one line per image, the statistics over images, the breakdown by
    module and operator, β per stage and per DGE block (fvcore beside the analytic Eq. 7
    count), and every op counted 0 or not counted."""
    summary = flops_summary(images)
    has_dge = bool(images[0].layers)
    k, unit = _unit(min(im.static_total for im in images))
    lines = [f"Per-image FLOPs ({unit}FLOPs; one fused multiply-add = 1 flop):"]
    head = f"  {'image':<28} {'input':>16} {'dynamic':>10} {'static':>10} {'ratio':>7}"
    lines.append(head + (f" {'β fvcore':>9} {'β Eq.7':>8}" if has_dge else ""))
    for im in images:
        shape = "×".join(str(s) for s in im.input_shape)
        row = f"  {im.name:<28} {shape:>16} {im.total / 1e9 * k:>10.2f} {im.static_total / 1e9 * k:>10.2f}"
        row += f" {im.ratio:>7.3f}"
        if has_dge:
            row += f" {im.beta:>9.3f} {im.beta_analytic:>8.3f}"
        lines.append(row)
    n = summary["num_images"]
    lines.append(f"Over {n} image(s):")
    lines.append(f"  {unit}FLOPs (dynamic): {_fmt(summary['gflops'], k)}")
    lines.append(f"  {unit}FLOPs (static, vanilla model): {_fmt(summary['static_gflops'], k)}")
    lines.append(f"  dynamic / static: {_fmt(summary['ratio'], digits=3)}")
    if has_dge:
        lines.append(f"  β (DGE blocks, fvcore): {_fmt(summary['beta'], digits=3)}")
        lines.append(f"  β (DGE blocks, analytic Eq. 7): {_fmt(summary['beta_analytic'], digits=3)}")
    else:
        lines.append("  the model has no DGE blocks: static FLOPs only (dynamic = static)")
    for title, key in (("module", "by_module_gflops"), ("operator", "by_operator_gflops")):
        lines.append(f"By {title} (mean {unit}FLOPs, dynamic / static):")
        for name, v in summary[key].items():
            lines.append(f"  {name:<36} {v['dynamic']['mean'] * k:>10.2f} / {v['static']['mean'] * k:.2f}")
    if has_dge:
        lines.append("Complexity ratio per stage (mean ± std over images; fvcore | analytic Eq. 7):")
        for name, v in summary["stages"].items():
            lines.append(f"  {name or '(model)':<36} {_fmt(v['beta'], digits=3)} | {v['beta_analytic']['mean']:.3f}")
        if per_layer:
            lines += _per_block_lines(summary, k, unit)
    titles = {
        "data movement": "Data movement (gather / scatter / pooling / indexing), 0 FLOPs:",
        "elementwise": "0 FLOPs by the fvcore/detectron2 convention (elementwise, reductions, NMS, ...):",
    }
    for c in CATEGORIES:
        ops = summary["zero_flop_ops"][c]
        if ops:
            lines.append(titles[c])
            lines.append("  " + ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items())))
    if summary["unsupported_ops"]:
        lines.append("UNSUPPORTED ops (no FLOP handle: NOT counted, the totals miss them):")
        lines.append("  " + ", ".join(f"{k} ×{v}" for k, v in sorted(summary["unsupported_ops"].items())))
    else:
        lines.append("Unsupported ops: none (every op executed is counted or listed above).")
    return "\n".join(lines)
