"""Training runs read back from their ``metrics.json`` and ``config.yaml`` (train_net.py and
tools/train_classifier.py write the same format): one point per run for the plots of
``tools/plot_runs.py`` (Fig. 5b, 5c)."""
import json
import logging
import os
import re
import statistics
from typing import Dict, List, Optional

import numpy as np
import yaml

__all__ = ["METRICS", "read_run", "merge_seeds"]

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
    run["scores"] = {k: float(v) for k, v in row.items()  # summary metrics, not per class ("AP-cat")
                     if k.split("/")[0] in _EVALUATED and "-" not in k}
    run["shares"] = {k.split("share_phi")[1]: v for k, v in row.items() if k.startswith("routing/share_phi")}
    return dict(run, folder=folder, **_training(rows))


_EVALUATED = ("bbox", "segm", "sem_seg", "classification")


def _training(rows: List[Dict]) -> Dict:
    """The training rows' curves: ``iterations``, ``train_stage_betas`` [stages][rows] (the
    batch β per stage under Gumbel sampling, ``dge/beta_stage*``) and ``seconds_per_iter``
    (median of detectron2's ``time``)."""
    rows = [r for r in rows if "dge/beta" in r]
    stages = sorted({int(k[len("dge/beta_stage"):]) for r in rows for k in r if k.startswith("dge/beta_stage")})
    times = [r["time"] for r in rows if "time" in r]
    return dict(
        iterations=[r["iteration"] for r in rows],
        train_stage_betas=[[r.get(f"dge/beta_stage{k}") for r in rows] for k in stages],
        seconds_per_iter=statistics.median(times) if times else None,
    )


def merge_seeds(runs: List[Dict]) -> List[Dict]:
    """Runs whose labels differ only in a trailing ``_s<N>`` are seeds of one setting: one row
    per setting with ``n`` and the mean and standard deviation (``*_sd``) of its scores, β,
    β per stage, shares of φ and seconds per iteration, in the order the settings first appear."""
    groups: Dict[str, List[Dict]] = {}
    for r in runs:
        groups.setdefault(re.sub(r"_s\d+$", "", r["label"]), []).append(r)
    merged = []
    for label, members in groups.items():
        values = {f"scores/{k}": [m["scores"].get(k) for m in members] for k in members[0]["scores"]}
        values.update({f"shares/{k}": [m["shares"].get(k) for m in members] for k in members[0]["shares"]})
        values["beta"] = [m["beta"] for m in members]
        values["seconds_per_iter"] = [m["seconds_per_iter"] for m in members]
        for i in range(len(members[0]["layer_betas"])):
            values[f"{members[0]['layer_unit']}{i + 1}"] = [m["layer_betas"][i] for m in members]
        row = dict(label=label, n=len(members))
        for key, vals in values.items():
            vals = np.array([v for v in vals if v is not None], dtype=float)
            row[key] = float(vals.mean()) if vals.size else None
            row[f"{key}_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else None
        merged.append(row)
    return merged
