"""The run plots of Fig. 5(b, c) (``dge.analysis.runs``, tools/plot_runs.py) on runs written here."""
import json
import os

import pytest
from repo import load_tool, read_csv


@pytest.fixture(scope="module")
def runs_tool():
    return load_tool("plot_runs")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------ tools/plot_runs.py
def write_detectron2_run(folder, budget, evals, enabled=True):
    """metrics.json (training rows, then evaluation rows (AP, β)) and config.yaml."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for it, (ap, beta) in enumerate(evals):
            stages = {f"dge/beta_stage{k}": 0.9 - 0.1 * k for k in range(1, 5)}
            f.write(json.dumps({"iteration": 100 * it + 19, "dge/beta": 0.9, "total_loss": 1.0, "time": 0.5, **stages}) + "\n")
            row = {"iteration": 100 * it + 99, "bbox/AP": ap, "segm/AP": ap - 2}
            if enabled:
                row.update({"routing/beta": beta, **{f"routing/beta_stage{k}": beta + 0.01 * k for k in range(1, 5)}})
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"MODEL:\n  META_ARCHITECTURE: DGERCNN\n  DGE:\n    ENABLED: {str(enabled).lower()}\n"
                f"    BUDGET: {budget}\n  PVT:\n    SIZE: small\n    ATTENTION: sr\n")
    return str(folder)


def write_classifier_run(folder, model, budget, rows):
    """What tools/train_classifier.py writes: metrics.json (detectron2's format) and config.yaml."""
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({"iteration": 10 * i + 5, "total_loss": 1.0}) + "\n")  # training rows
            f.write(json.dumps(dict(row, iteration=10 * i + 10)) + "\n")
    enabled = model.endswith("_dge")
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(f"MODEL:\n  NAME: {model}\n  DGE:\n    ENABLED: {str(enabled).lower()}\n    BUDGET: {budget}\n")
    return str(folder)


def test_plot_runs_draws_ap_against_budget_and_beta_per_stage_of_detectron2_runs(runs_tool, tmp_path):
    quarter = write_detectron2_run(tmp_path / "b025", 0.25, [(20.0, 0.30), (25.0, 0.27), (24.0, 0.26)])
    half = write_detectron2_run(tmp_path / "b05", 0.5, [(30.0, 0.55), (31.0, 0.52)])
    out = tmp_path / "plots"
    result = runs_tool.main([quarter, half, "--output", str(out)])
    saved = json.loads((out / "runs.json").read_text())
    assert saved["metric"] == "bbox/AP" and len(saved["runs"]) == 2
    runs = {r["label"]: r for r in saved["runs"]}
    assert (runs["b025"]["value"], runs["b025"]["budget"], runs["b025"]["beta"]) == (24.0, 0.25, 0.26)  # last eval
    assert (runs["b05"]["value"], runs["b05"]["budget"], runs["b05"]["beta"]) == (31.0, 0.5, 0.52)
    assert runs["b025"]["layer_unit"] == "stage"
    assert runs["b025"]["layer_betas"] == pytest.approx([0.27, 0.28, 0.29, 0.30])
    assert runs["b025"]["group"] == runs["b05"]["group"] == "DGERCNN PVT-small"
    assert (out / "metric_vs_budget.png").stat().st_size > 5000 and (out / "beta_per_layer.png").stat().st_size > 5000
    assert len(read_csv(out / "runs.csv")) == 2 and result["files"]["json"] == str(out / "runs.json")
    # --select best takes the best evaluation, and β of that same evaluation
    best = runs_tool.main([quarter, half, "--select", "best", "--metric", "segm/AP", "--output", str(out)])
    quarter_best = next(r for r in best["runs"] if r["label"] == "b025")
    assert (best["metric"], quarter_best["value"], quarter_best["beta"]) == ("segm/AP", 23.0, 0.27)
    # a run without DGE: β 1, no budget, no per-stage β
    vanilla = runs_tool.read_run(write_detectron2_run(tmp_path / "vanilla", 0.5, [(33.0, None)], enabled=False))
    assert (vanilla["vanilla"], vanilla["budget"], vanilla["beta"], vanilla["layer_betas"]) == (True, None, 1.0, [])


def test_plot_runs_reads_budgets_from_classifier_configs_and_draws_beta_per_layer(runs_tool, tmp_path):
    def epoch(e, acc, beta=None):
        row = {"epoch": e, "classification/acc1": acc, "train/loss": 1.0}
        if beta is not None:
            row.update({"routing/beta": beta, "routing/beta_stage1": beta})
            row.update({f"routing/beta_layer{i}": beta + 0.01 * i for i in range(1, 13)})
        return row

    dge = write_classifier_run(
        tmp_path / "deit_t_b05", "deit_tiny_dge", 0.5, [epoch(0, 50.0, 0.6), epoch(1, 55.0, 0.51)]
    )
    vanilla = write_classifier_run(tmp_path / "deit_t", "deit_tiny_vanilla", None, [epoch(0, 58.0)])
    out = tmp_path / "plots"
    result = runs_tool.main([dge, vanilla, "--labels", "DGE γ=0.5", "vanilla", "--output", str(out)])
    runs = {r["label"]: r for r in result["runs"]}
    assert result["metric"] == "classification/acc1" and len(runs) == 2
    with_dge = runs["DGE γ=0.5"]
    assert (with_dge["budget"], with_dge["beta"], with_dge["vanilla"]) == (0.5, 0.51, False)
    assert with_dge["layer_unit"] == "layer"
    assert with_dge["layer_betas"] == pytest.approx([0.51 + 0.01 * i for i in range(1, 13)])
    assert runs["vanilla"]["vanilla"] and runs["vanilla"]["budget"] is None and runs["vanilla"]["beta"] == 1.0
    assert runs["vanilla"]["layer_betas"] == [] and runs["vanilla"]["group"] == with_dge["group"] == "deit_tiny"
    assert json.loads((out / "runs.json").read_text())["runs"][0]["value"] == 55.0
    assert (out / "metric_vs_budget.png").exists() and (out / "beta_per_layer.png").exists()


def test_plot_runs_errors_name_the_run_and_what_it_lacks(runs_tool, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        runs_tool.read_run(str(tmp_path / "nope"))
    parent = tmp_path / "output"
    run = write_detectron2_run(parent / "b05", 0.5, [(30.0, 0.5)])
    with pytest.raises(FileNotFoundError, match=r"no metrics.json .* sub-folders \['b05'\] are runs"):
        runs_tool.read_run(str(parent))
    training_only = tmp_path / "training_only"
    training_only.mkdir()
    (training_only / "metrics.json").write_text(json.dumps({"iteration": 19, "total_loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="no evaluation row with bbox/AP"):
        runs_tool.read_run(str(training_only))
    classifier = write_classifier_run(
        tmp_path / "cls", "deit_tiny_dge", 0.5, [{"epoch": 0, "classification/acc1": 1.0, "routing/beta": 0.5}]
    )
    with pytest.raises(ValueError, match="different metrics"):
        runs_tool.main([run, classifier, "--output", str(tmp_path / "plots")])
    with pytest.raises(ValueError, match="no evaluation row with mIoU"):
        runs_tool.main([run, "--metric", "mIoU", "--output", str(tmp_path / "plots")])


def test_plot_runs_merges_seeds_and_draws_beta_per_stage_over_training(runs_tool, tmp_path):
    runs = [write_detectron2_run(tmp_path / f"paper_s{s}", 0.5, [(20.0 + s, 0.5)]) for s in range(3)]
    runs.append(write_detectron2_run(tmp_path / "official_s0", 0.5, [(30.0, 0.4)]))
    with open(os.path.join(runs[0], "metrics.json"), "a") as f:  # a per-class AP is not a setting's score
        f.write(json.dumps({"iteration": 300, "bbox/AP": 24.0, "bbox/AP-disc": 9.0, "routing/beta": 0.5}) + "\n")
    out = tmp_path / "merged"
    result = runs_tool.main(runs + ["--merge-seeds", "--output", str(out)])
    settings = {row["label"]: row for row in read_csv(out / "settings.csv")}
    assert set(settings) == {"paper", "official"}
    assert (settings["paper"]["n"], settings["official"]["n"]) == ("3", "1")
    assert float(settings["paper"]["scores/bbox/AP"]) == pytest.approx((24.0 + 21.0 + 22.0) / 3, abs=0.01)  # 4 significant digits
    assert float(settings["paper"]["scores/bbox/AP_sd"]) == pytest.approx(1.5275, abs=1e-3)
    assert "scores/bbox/AP-disc" not in settings["paper"] and settings["official"]["scores/bbox/AP_sd"] == ""
    assert float(settings["official"]["stage1"]) == pytest.approx(0.41)
    assert (out / "beta_training.png").stat().st_size > 5000 and "beta_training" in result["files"]
    assert float(settings["paper"]["seconds_per_iter"]) == 0.5
