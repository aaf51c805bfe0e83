"""matplotlib figures of the paper's analyses, drawn from plain numbers and saved as PNG (Agg
backend): the redundancy statistics of Fig. 2 and the run comparisons of Fig. 5(b, c)."""
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = [
    "METRIC_LABELS",
    "pyplot",
    "plot_block_betas",
    "plot_accuracy_complexity",
    "plot_budget_curves",
    "plot_correlation_histogram",
    "plot_layer_betas",
    "plot_layer_histograms",
    "plot_layer_variance",
    "plot_metric_vs_budget",
    "plot_training_betas",
]


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_correlation_histogram(edges: np.ndarray, counts: np.ndarray, path: str, title: str = "") -> str:
    """Fig. 2(a): share of coefficients per bin (``counts`` [bins] over ``edges`` [bins + 1])."""
    plt = pyplot()
    counts = np.asarray(counts, dtype=float)
    share = counts / max(counts.sum(), 1.0)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="none")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("Pearson coefficient with the 2×2 patch mean")
    ax.set_ylabel("share of tokens")
    ax.set_title(title or "Correlation coefficients, all layers", fontsize=9)
    return _save(fig, path)


def plot_layer_histograms(
    edges: np.ndarray, histograms: np.ndarray, names: Sequence[str], path: str, title: str = ""
) -> str:
    """Fig. 2(a) per layer: one small histogram per block (``histograms`` [L, bins])."""
    plt = pyplot()
    num = len(names)
    cols = min(4, num)
    rows = -(-num // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.2 * rows + 0.4), sharex=True, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= num:
            ax.axis("off")
            continue
        counts = np.asarray(histograms[i], dtype=float)
        ax.bar(edges[:-1], counts / max(counts.sum(), 1.0), width=np.diff(edges), align="edge", color="tab:blue")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(f"layer {i + 1}: {names[i]}", fontsize=8)
        ax.set_xticks([-1.0, -0.5, 0.0, 0.5, 1.0])
        ax.tick_params(labelsize=7)
    fig.suptitle(title or "Correlation coefficients per layer", fontsize=9)
    return _save(fig, path)


def plot_layer_variance(image_means: np.ndarray, path: str, title: str = "") -> str:
    """Fig. 2(c): top, each image's mean coefficient per layer (one dot per image, box over
    images); bottom, their variance across images per layer. ``image_means`` [N, L]."""
    plt = pyplot()
    image_means = np.asarray(image_means, dtype=float)
    num_layers = image_means.shape[1]
    x = np.arange(1, num_layers + 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(5.5, 0.45 * num_layers + 2.0), 5.5), sharex=True)
    columns = [col[~np.isnan(col)] for col in image_means.T]
    top.boxplot(columns, positions=x, widths=0.6, showfliers=False)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, image_means.shape)
    top.scatter((x[None, :] + jitter).ravel(), image_means.ravel(), s=6, alpha=0.5, color="tab:blue")
    top.set_ylabel("mean coefficient per image")
    top.set_title(title or f"Redundancy across {image_means.shape[0]} image(s)", fontsize=9)
    bottom.bar(x, np.nanvar(image_means, axis=0), color="tab:orange")
    bottom.set_ylabel("variance across images")
    bottom.set_xlabel("layer")
    bottom.set_xticks(x)
    return _save(fig, path)


def plot_accuracy_complexity(
    curve: Sequence[Dict], path: str, baseline: Optional[float] = None, title: str = ""
) -> str:
    """Fig. 2(b): top-1 against the share of queries kept, one point per threshold (annotated);
    ``curve`` rows have ``threshold``, ``acc1``, ``query_ratio``; ``baseline`` is the vanilla top-1."""
    plt = pyplot()
    rows = sorted(curve, key=lambda r: r["query_ratio"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["query_ratio"] for r in rows], [r["acc1"] for r in rows], "o-", color="tab:blue")
    for r in rows:
        ax.annotate(f"{r['threshold']:g}", (r["query_ratio"], r["acc1"]), textcoords="offset points",
                    xytext=(3, 4), fontsize=7)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", linewidth=1, label=f"vanilla: {baseline:.2f}")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("complexity (share of queries computed)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "Replacing redundant tokens by their patch mean", fontsize=9)
    return _save(fig, path)


# Axis labels of the metrics the trainers write.
METRIC_LABELS = {
    "classification/acc1": "top-1 accuracy (%)",
    "bbox/AP": "box AP",
    "segm/AP": "mask AP",
    "sem_seg/mIoU": "mIoU (%)",
}


def plot_metric_vs_budget(runs: Sequence[Dict], metric: str, path: str) -> str:
    """Fig. 5(b): ``metric`` against the budget γ (left) and the measured β (right), one point
    per run labelled by ``label``; runs of one ``group`` are joined; ``vanilla`` runs (no DGE)
    are dashed horizontal lines. Each run: label, group, value, budget (or None), beta (or None),
    vanilla."""
    plt = pyplot()
    colours = plt.get_cmap("tab10")
    groups = list(dict.fromkeys(r["group"] for r in runs))
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0), sharey=True)
    for ax, key, xlabel in zip(axes, ("budget", "beta"), ("budget γ", "measured complexity ratio β")):
        for g, group in enumerate(groups):
            members = [r for r in runs if r["group"] == group]
            for r in members:
                if r["vanilla"]:
                    ax.axhline(r["value"], color=colours(g % 10), linestyle="--", linewidth=1)
                    ax.annotate(f"{r['label']} (vanilla)", (0.0, r["value"]), xycoords=("axes fraction", "data"),
                                xytext=(3, 3), textcoords="offset points", fontsize=7, color=colours(g % 10))
            points = sorted(
                (r[key], r["value"], r["label"]) for r in members if not r["vanilla"] and r[key] is not None
            )
            if points:
                xs, ys, labels = zip(*points)
                ax.plot(xs, ys, "o-", color=colours(g % 10), label=group)
                for x, y, label in points:
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    label = METRIC_LABELS.get(metric, metric)
    axes[0].set_ylabel(label)
    axes[0].set_title(f"{label} vs budget", fontsize=9)
    axes[1].set_title(f"{label} vs measured β", fontsize=9)
    if any(not r["vanilla"] for r in runs):
        axes[1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_budget_curves(families: Dict[str, Sequence[Dict]], metrics: Sequence[str], path: str) -> str:
    """Accuracy against budget: one row per metric, against the measured β (left) and the
    backbone ms per image (right); one line per family, its points labelled. Each point:
    ``label``, ``beta``, ``backbone_ms`` and the metrics it has."""
    plt = pyplot()
    colours = plt.get_cmap("tab10")
    markers = "osD^v"
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10.0, 3.6 * len(metrics)), squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, key, xlabel in zip(row, ("beta", "backbone_ms"),
                                   ("measured complexity ratio β", "backbone latency (ms per image)")):
            for f, (name, points) in enumerate(families.items()):
                found = sorted((p[key], p[metric], p["label"]) for p in points if metric in p and key in p)
                if not found:
                    continue
                xs, ys, labels = zip(*found)
                ax.plot(xs, ys, marker=markers[f % len(markers)], color=colours(f % 10), label=name)
                for x, y, label in found:
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7,
                                color=colours(f % 10))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(METRIC_LABELS.get(metric, metric))
            ax.grid(alpha=0.3)
        row[0].set_title(f"{METRIC_LABELS.get(metric, metric)} vs measured β", fontsize=9)
        row[1].set_title(f"{METRIC_LABELS.get(metric, metric)} vs backbone latency", fontsize=9)
    axes[0][0].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_layer_betas(series: Sequence[Dict], path: str) -> str:
    """Fig. 5(c): β per layer (or per stage) of each run: bars for one run, lines for several.
    Each series: ``label``, ``unit`` ("layer" / "stage"), ``values`` [L]."""
    plt = pyplot()
    longest = max(len(s["values"]) for s in series)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.45 * longest + 2.0), 3.8))
    units = sorted({s["unit"] for s in series})
    if len(series) == 1:
        values = series[0]["values"]
        ax.bar(np.arange(1, len(values) + 1), values, color="tab:blue", label=series[0]["label"])
    else:
        for s in series:
            ax.plot(np.arange(1, len(s["values"]) + 1), s["values"], "o-", markersize=4, label=s["label"])
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(np.arange(1, longest + 1))
    ax.set_xlabel(" / ".join(units))
    ax.set_ylabel("complexity ratio β")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(f"Complexity ratio per {' / '.join(units)}", fontsize=9)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_block_betas(images: Sequence, path: str) -> str:
    """Box plot of β per DGE block over the images (fvcore), the analytic Eq. 7 mean as a
    marker, one colour per stage (the paper's Fig. 5c); ``images`` are ``ImageFlops``."""
    plt = pyplot()
    layers = images[0].layers
    stages = list(dict.fromkeys(l.stage for l in layers))
    betas = [[im.layers[i].beta for im in images] for i in range(len(layers))]
    analytic = [np.mean([im.layers[i].beta_analytic for im in images]) for i in range(len(layers))]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2.0), 4.0))
    box = ax.boxplot(betas, positions=range(len(layers)), widths=0.6, patch_artist=True)
    for i, patch in enumerate(box["boxes"]):
        patch.set_facecolor(colours(stages.index(layers[i].stage) % 10))
        patch.set_alpha(0.6)
    ax.plot(range(len(layers)), analytic, "k_", markersize=12, label="analytic (Eq. 7), mean")
    labels = [f"s{stages.index(l.stage) + 1}.{l.name.rsplit('.', 1)[-1]}" for l in layers]
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels(labels, rotation=90, fontsize=8)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("DGE block (stage.block)")
    ax.set_ylabel("complexity ratio β")
    ax.set_title(f"Complexity ratio per block over {len(images)} image(s) (fvcore)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_training_betas(runs: Sequence[Dict], path: str) -> str:
    """β per stage over training (the batch β under Gumbel sampling, one panel per stage), a
    line per run, one colour per setting (``group``: runs of one setting share it). Each run:
    ``label``, ``group``, ``iterations``, ``train_stage_betas`` [stages][points]."""
    plt = pyplot()
    stages = max(len(r["train_stage_betas"]) for r in runs)
    groups = list(dict.fromkeys(r["group"] for r in runs))
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, stages, figsize=(3.2 * stages, 3.2), sharey=True, squeeze=False)
    for k, ax in enumerate(axes[0]):
        labelled = set()  # one legend entry per group
        for r in runs:
            if k < len(r["train_stage_betas"]):
                label = None if r["group"] in labelled else r["group"]
                labelled.add(r["group"])
                ax.plot(r["iterations"], r["train_stage_betas"][k], color=colours(groups.index(r["group"]) % 10),
                        linewidth=1.0, alpha=0.8, label=label)
        ax.set_title(f"stage {k + 1}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylim(0.0, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training β (Gumbel-sampled)")
    axes[0][0].legend(fontsize=8, loc="lower left")
    return _save(fig, path)
