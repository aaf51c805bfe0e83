"""Training runs read back from their ``metrics.json`` and ``config.yaml`` (train_net.py and
tools/train_classifier.py write the same format): one point per run for the plots of
``tools/plot_runs.py`` (Fig. 5b, 5c)."""
import json
import logging
import os
import re
from typing import Dict, List, Optional

import yaml

__all__ = ["METRICS", "read_run"]

logger = logging.getLogger(__name__)

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
