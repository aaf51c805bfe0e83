#!/usr/bin/env python
"""Compare training runs: accuracy or AP against the budget γ and the measured β (Fig. 5b), and
the complexity ratio β per layer or stage (Fig. 5c).

    python tools/plot_runs.py output/pvt_s_dge_b025 output/pvt_s_dge_b05 output/pvt_s_dge_b075 \\
        output/pvt_s --output output/budget_sweep
    python tools/plot_runs.py output/mask_rcnn_* --metric segm/AP --select best

Each RUN folder is one of
a train_net.py or tools/train_classifier.py output: both write ``metrics.json`` with
detectron2's writer (evaluation rows: bbox/AP, segm/AP, sem_seg/mIoU or classification/acc1,
with routing/beta, routing/beta_stage* and, for the classifier, routing/beta_layer*) and
``config.yaml`` (MODEL.DGE.ENABLED, MODEL.DGE.BUDGET, the backbone or MODEL.NAME).
A run's point is its last evaluation (``--select last``) or its best (``--select best``), and
its β is measured in that same evaluation. Runs without DGE are drawn as dashed lines. Runs
of one backbone are joined. ``train_net.py --eval-only`` writes no metrics.json: evaluate
inside training (TEST.EVAL_PERIOD) to get a plottable run.

Writes to --output (default output/runs): ``metric_vs_budget.png``, ``beta_per_layer.png``
(when a run has β per layer / stage), ``runs.json`` and ``runs.csv``.
"""
import argparse
import csv
import json
import logging
import os
import re
import sys
from typing import Dict, List, Optional


from dge.analysis.plots import plot_layer_betas, plot_metric_vs_budget
from dge.engine import setup_dge_logger

logger = logging.getLogger("dge.plot_runs")

METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU", "classification/acc1")


def _read_jsonl(path: str) -> List[Dict]:
    """The rows of a JSON-lines file; a truncated last line (a run killed while writing) is skipped."""
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning(f"{path}: skipping its unreadable last line ({e})")
            else:
                raise ValueError(f"{path}: line {i + 1} is not JSON ({e})") from e
    return rows


def _numbered(row: Dict, prefix: str) -> List[float]:
    """Values of ``prefix1``, ``prefix2``, ... in ``row``, in numeric order."""
    found = sorted((int(m.group(1)), v) for k, v in row.items() if (m := re.fullmatch(re.escape(prefix) + r"(\d+)", k)))
    return [v for _, v in found]


def _pick(rows: List[Dict], metric: str, select: str) -> Dict:
    rows = [r for r in rows if metric in r]
    return max(rows, key=lambda r: r[metric]) if select == "best" else rows[-1]


def _metric_for(rows: List[Dict], metric: Optional[str]) -> Optional[str]:
    keys = set().union(*rows) if rows else set()
    options = METRICS if metric is None else (metric, f"classification/{metric}")
    return next((m for m in options if m in keys), None)


def _describe(folder: str) -> Dict:
    """vanilla, budget and group from the run's ``config.yaml`` (train_net.py: the detectron2
    config; tools/train_classifier.py: MODEL.NAME and MODEL.DGE of its arguments)."""
    config_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(config_path):
        logger.warning(f"{folder} has no config.yaml: its budget is unknown (it is drawn against β only)")
        return dict(vanilla=None, budget=None, group=os.path.basename(os.path.dirname(os.path.abspath(folder))) or "runs")
    import yaml

    with open(config_path) as f:
        model = (yaml.safe_load(f) or {}).get("MODEL", {})
    dge, pvt = model.get("DGE", {}), model.get("PVT", {})
    vanilla = not dge.get("ENABLED", False)
    if "NAME" in model:  # the classifier: DGE and vanilla twins share a group
        group = re.sub(r"(_vanilla|_dge)?$", "", model["NAME"]) or "runs"
    else:
        family = "DPVT" if pvt.get("ATTENTION") == "deformable" else "PVT"
        group = f"{model.get('META_ARCHITECTURE', '')} {family}-{pvt.get('SIZE', '?')}".strip()
    return dict(vanilla=vanilla, budget=None if vanilla else dge.get("BUDGET"), group=group)


def read_run(folder: str, metric: Optional[str] = None, select: str = "last") -> Dict:
    """One run's point from its ``metrics.json`` (train_net.py and tools/train_classifier.py
    write the same format): kind, metric, value, step (iteration), budget (None: unknown or no
    DGE), beta, vanilla, group, layer_betas, layer_unit. Raises FileNotFoundError for a folder
    without metrics, ValueError for metrics without an evaluation."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"run folder {folder!r} does not exist")
    path = os.path.join(folder, "metrics.json")
    if not os.path.isfile(path):
        inside = sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "metrics.json")))
        hint = f"; its sub-folders {inside[:6]} are runs: pass them instead" if inside else ""
        raise FileNotFoundError(f"{folder!r} has no metrics.json (train_net.py, tools/train_classifier.py){hint}")
    rows = _read_jsonl(path)
    key = _metric_for(rows, metric)
    if key is None:
        wanted = metric or " / ".join(METRICS)
        evaluated = sorted({k for r in rows for k in r if "/" in k and k.split("/")[0] in
                            ("bbox", "segm", "sem_seg", "classification")})
        raise ValueError(
            f"{path} has no evaluation row with {wanted} ({len(rows)} rows; evaluation keys seen: {evaluated[:8]}). "
            "The run never evaluated: set TEST.EVAL_PERIOD, or let training finish"
        )
    row = _pick(rows, key, select)
    run = dict(kind="classifier" if key.startswith("classification/") else "detectron2", metric=key,
               value=float(row[key]), step=row.get("iteration"), **_describe(folder))
    if run["vanilla"] is None:
        run["vanilla"] = "routing/beta" not in row
    run["beta"] = 1.0 if run["vanilla"] else row.get("routing/beta")
    layers, stages = _numbered(row, "routing/beta_layer"), _numbered(row, "routing/beta_stage")
    if layers:
        run["layer_betas"], run["layer_unit"] = layers, "layer"
    else:
        run["layer_betas"], run["layer_unit"] = (stages, "stage") if stages else ([], None)
    return dict(run, folder=folder)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train_net.py or train_classifier.py)")
    parser.add_argument("--metric", help="bbox/AP, segm/AP, sem_seg/mIoU, classification/acc1 (or acc1), ...; default: the "
                        "first of these each run has")
    parser.add_argument("--select", choices=("last", "best"), default="last",
                        help="which evaluation of a run: its last or its best (default: last)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--output", default="output/runs", metavar="DIR")
    return parser


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_dge_logger()
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"--labels needs one label per run: {len(args.runs)} runs, {len(args.labels)} labels")
    runs = [read_run(folder, args.metric, args.select) for folder in args.runs]
    metrics = sorted({r["metric"] for r in runs})
    if len(metrics) > 1:
        which = {os.path.basename(os.path.normpath(r["folder"])): r["metric"] for r in runs}
        raise ValueError(f"the runs report different metrics {which}: pass --metric, or plot them separately")
    labels = args.labels or [os.path.basename(os.path.normpath(f)) for f in args.runs]
    for run, label in zip(runs, labels):
        run["label"] = label
    metric = metrics[0]

    os.makedirs(args.output, exist_ok=True)
    files = {"metric_vs_budget": plot_metric_vs_budget(runs, metric, os.path.join(args.output, "metric_vs_budget.png"))}
    series = [dict(label=r["label"], unit=r["layer_unit"], values=r["layer_betas"]) for r in runs if r["layer_betas"]]
    if series:
        files["beta_per_layer"] = plot_layer_betas(series, os.path.join(args.output, "beta_per_layer.png"))
    else:
        logger.info("no run has β per layer or stage (runs without DGE): beta_per_layer.png not written")
    columns = ["label", "folder", "kind", "group", "metric", "value", "budget", "beta", "vanilla", "step"]
    with open(os.path.join(args.output, "runs.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns + ["layer_unit", "layer_betas"])
        for r in runs:
            writer.writerow([r[c] for c in columns] + [r["layer_unit"], " ".join(f"{v:.4f}" for v in r["layer_betas"])])
    files.update(json=os.path.join(args.output, "runs.json"), csv=os.path.join(args.output, "runs.csv"))
    result = {"metric": metric, "select": args.select, "runs": runs, "files": files}
    with open(files["json"], "w") as f:
        json.dump(result, f, indent=1)
    for r in runs:
        budget = "vanilla" if r["vanilla"] else ("γ ?" if r["budget"] is None else f"γ {r['budget']:g}")
        beta = "β ?" if r["beta"] is None else f"β {r['beta']:.3f}"
        logger.info(f"{r['label']}: {metric} {r['value']:.2f}  {budget}  {beta}")
    logger.info(f"wrote {', '.join(os.path.basename(p) for p in files.values())} to {args.output}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
