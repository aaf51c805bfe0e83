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
from typing import Dict


from dge.analysis.plots import plot_layer_betas, plot_metric_vs_budget, plot_training_betas
from dge.analysis.runs import merge_seeds, read_run
from dge.detectron2.engine import run_tool, setup_dge_logger

logger = logging.getLogger("dge.plot_runs")

def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train_net.py or train_classifier.py)")
    parser.add_argument("--metric", help="bbox/AP, segm/AP, sem_seg/mIoU, classification/acc1 (or acc1), ...; default: the "
                        "first of these each run has")
    parser.add_argument("--select", choices=("last", "best"), default="last",
                        help="which evaluation of a run: its last or its best (default: last)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    parser.add_argument("--merge-seeds", action="store_true",
                        help="runs whose labels differ only in a trailing _s<N> are seeds of one setting: "
                        "write settings.csv with the mean and sd of each setting's scores, β and s/it")
    parser.add_argument("--output", default="output/runs", metavar="DIR")
    return parser


def _write_settings(settings, path: str) -> str:
    columns = list(dict.fromkeys(k for s in settings for k in s))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for s in settings:
            writer.writerow([s.get(c) if not isinstance(s.get(c), float) else f"{s[c]:.4g}" for c in columns])
    for s in settings:
        scores = "  ".join(f"{k[7:]} {v:.2f}" for k, v in s.items() if k.startswith("scores/") and
                           not k.endswith("_sd") and k.split("/")[-1] in ("AP", "AP50", "mIoU", "acc1"))
        logger.info(f"{s['label']} (n={s['n']}): {scores}  β {s['beta']:.3f}  {s['seconds_per_iter'] or 0:.3f} s/it")
    return path


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
    trained = [dict(r, group=re.sub(r"_s\d+$", "", r["label"])) for r in runs if r["train_stage_betas"]]
    if trained:
        files["beta_training"] = plot_training_betas(trained, os.path.join(args.output, "beta_training.png"))
    if args.merge_seeds:
        files["settings"] = _write_settings(merge_seeds(runs), os.path.join(args.output, "settings.csv"))
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
    run_tool(main)
