#!/usr/bin/env python
"""Compare training runs: accuracy or AP against the budget γ and the measured β (Fig. 5b), and
the complexity ratio β per layer or stage (Fig. 5c).

    python tools/plot_runs.py output/pvt_s_dge_b025 output/pvt_s_dge_b05 output/pvt_s_dge_b075 \\
        output/pvt_s --output output/budget_sweep
    python tools/plot_runs.py output/mask_rcnn_* --metric segm/AP --select best

Each RUN folder is one of
  - a train_net.py output: ``metrics.json`` (its evaluation rows: bbox/AP, segm/AP or
    sem_seg/mIoU, with routing/beta and routing/beta_stage*) and ``config.yaml``
    (MODEL.DGE.ENABLED, MODEL.DGE.BUDGET, the backbone);
  - a tools/train_classifier.py output: ``log.jsonl`` (one row per epoch: val_acc1, val_beta,
    val_beta_layer*, val_beta_stage*) and ``checkpoint.pth`` / ``best.pth`` (their ``args``:
    model, no_dge, budget).
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
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dge.analysis.plots import plot_layer_betas, plot_metric_vs_budget  # noqa: E402

logger = logging.getLogger("dge.plot_runs")

DETECTRON2_METRICS = ("bbox/AP", "segm/AP", "sem_seg/mIoU")
CLASSIFIER_METRICS = ("val_acc1",)
CHECKPOINTS = ("checkpoint.pth", "best.pth")


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


def _metric_for(rows: List[Dict], candidates: Tuple[str, ...], metric: Optional[str]) -> Optional[str]:
    keys = set().union(*rows) if rows else set()
    if metric is not None:
        options = (metric, f"val_{metric}") if candidates == CLASSIFIER_METRICS else (metric,)
        return next((m for m in options if m in keys), None)
    return next((m for m in candidates if m in keys), None)


def read_detectron2_run(folder: str, metric: Optional[str], select: str) -> Dict:
    path = os.path.join(folder, "metrics.json")
    rows = _read_jsonl(path)
    key = _metric_for(rows, DETECTRON2_METRICS, metric)
    if key is None:
        wanted = metric or " / ".join(DETECTRON2_METRICS)
        evaluated = sorted({k for r in rows for k in r if "/" in k and k.split("/")[0] in ("bbox", "segm", "sem_seg")})
        raise ValueError(
            f"{path} has no evaluation row with {wanted} ({len(rows)} rows; evaluation keys seen: {evaluated[:8]}). "
            "The run never evaluated: set TEST.EVAL_PERIOD, or let training finish"
        )
    row = _pick(rows, key, select)
    run = dict(kind="detectron2", metric=key, value=float(row[key]), step=row.get("iteration"), budget=None,
               group=os.path.basename(os.path.dirname(os.path.abspath(folder))) or "runs", vanilla=None)
    config_path = os.path.join(folder, "config.yaml")
    if os.path.isfile(config_path):
        import yaml

        with open(config_path) as f:
            model = (yaml.safe_load(f) or {}).get("MODEL", {})
        dge, pvt = model.get("DGE", {}), model.get("PVT", {})
        run["vanilla"] = not dge.get("ENABLED", False)
        run["budget"] = None if run["vanilla"] else dge.get("BUDGET")
        family = "DPVT" if pvt.get("ATTENTION") == "deformable" else "PVT"
        run["group"] = f"{model.get('META_ARCHITECTURE', '')} {family}-{pvt.get('SIZE', '?')}".strip()
    else:
        logger.warning(f"{folder} has no config.yaml: its budget is unknown (it is drawn against β only)")
    if run["vanilla"] is None:
        run["vanilla"] = "routing/beta" not in row
    run["beta"] = 1.0 if run["vanilla"] else row.get("routing/beta")
    stages = _numbered(row, "routing/beta_stage")
    run["layer_betas"], run["layer_unit"] = (stages, "stage") if stages else ([], None)
    return run


def _classifier_args(folder: str) -> Optional[Dict]:
    """The ``args`` a tools/train_classifier.py checkpoint of ``folder`` was trained with."""
    import torch

    for name in CHECKPOINTS:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("args")
            except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, ... for bad files
                logger.warning(f"could not read {path} ({type(e).__name__}: {e})")
    return None


def read_classifier_run(folder: str, metric: Optional[str], select: str) -> Dict:
    path = os.path.join(folder, "log.jsonl")
    rows = _read_jsonl(path)
    key = _metric_for(rows, CLASSIFIER_METRICS, metric)
    if key is None:
        seen = sorted(k for k in set().union(*rows) if k.startswith("val_")) if rows else []
        raise ValueError(
            f"{path} has no epoch row with {metric or 'val_acc1'} ({len(rows)} rows; val keys: {seen[:8]})"
        )
    row = _pick(rows, key, select)
    args = _classifier_args(folder)
    run = dict(kind="classifier", metric=key, value=float(row[key]), step=row.get("epoch"), budget=None)
    if args is not None:
        run["vanilla"] = not args.get("model", "").endswith("_dge") or bool(args.get("no_dge"))
        run["budget"] = None if run["vanilla"] else args.get("budget")
        run["group"] = re.sub(r"(_patch16_256)?(_dge)?$", "", args.get("model", "")) or "runs"  # DGE + vanilla
    else:
        logger.warning(f"{folder} has no readable {' / '.join(CHECKPOINTS)}: its budget is unknown "
                       "(it is drawn against β only)")
        run["vanilla"] = "val_beta" not in row
        run["group"] = os.path.basename(os.path.dirname(os.path.abspath(folder))) or "runs"
    run["beta"] = 1.0 if run["vanilla"] else row.get("val_beta")
    layers, stages = _numbered(row, "val_beta_layer"), _numbered(row, "val_beta_stage")
    if layers:
        run["layer_betas"], run["layer_unit"] = layers, "layer"
    else:
        run["layer_betas"], run["layer_unit"] = (stages, "stage") if stages else ([], None)
    return run


def read_run(folder: str, metric: Optional[str] = None, select: str = "last") -> Dict:
    """One run's point: kind, metric, value, step (iteration / epoch), budget (None: unknown or no
    DGE), beta, vanilla, group, layer_betas, layer_unit. Raises FileNotFoundError for a folder
    without metrics, ValueError for metrics without an evaluation."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"run folder {folder!r} does not exist")
    if os.path.isfile(os.path.join(folder, "metrics.json")):
        run = read_detectron2_run(folder, metric, select)
    elif os.path.isfile(os.path.join(folder, "log.jsonl")):
        run = read_classifier_run(folder, metric, select)
    else:
        inside = sorted(
            d for d in os.listdir(folder)
            if any(os.path.isfile(os.path.join(folder, d, f)) for f in ("metrics.json", "log.jsonl"))
        )
        hint = f"; its sub-folders {inside[:6]} are runs: pass them instead" if inside else ""
        raise FileNotFoundError(
            f"{folder!r} has no metrics.json (train_net.py) and no log.jsonl (tools/train_classifier.py){hint}"
        )
    return dict(run, folder=folder)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train_net.py or train_classifier.py)")
    parser.add_argument("--metric", help="bbox/AP, segm/AP, sem_seg/mIoU, val_acc1 (or acc1), ...; default: the "
                        "first of these each run has")
    parser.add_argument("--select", choices=("last", "best"), default="last",
                        help="which evaluation of a run: its last or its best (default: last)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--output", default="output/runs", metavar="DIR")
    return parser


def main(argv=None) -> Dict:
    parser = get_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
