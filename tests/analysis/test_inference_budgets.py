"""Inference budgets: router offsets calibrated for β targets, stored in a checkpoint, chosen
by MODEL.DGE.INFERENCE_BUDGET in evaluation and the predictor."""
import os
import shutil

import numpy as np
import pytest
import torch

from train_helpers import DEMO

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SIZE = ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A demo-config checkpoint whose routers route by content (random gate weights stand in
    for trained ones: the budget machinery does not care how they were learnt)."""
    from detectron2.modeling import build_model

    from dge.layers.calibration import randomize_routers
    from dge.config import load_config

    torch.manual_seed(0)
    model = build_model(load_config(DEMO, SIZE))
    randomize_routers(model.backbone, seed=1)
    path = str(tmp_path_factory.mktemp("budget") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def calibrate(*args):
    from calibrate_budget import main

    return main(["--config-file", DEMO, *args, *SIZE])


TARGETS = (0.4, 0.7, 1.0)


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory):
    """(tools/calibrate_budget.py's result for TARGETS on the train images, the file it wrote)."""
    out = str(tmp_path_factory.mktemp("calibrated") / "budgets.pth")
    result = calibrate("--target-beta", *map(str, TARGETS), "--images", "dge_synthetic_train", "--output", out,
                       "MODEL.WEIGHTS", trained)
    return result, out


def test_calibration_hits_each_target_on_held_out_images_and_keeps_them_all(calibrated, tmp_path):
    result, out = calibrated
    for row, target in zip(result["budgets"], TARGETS):
        assert abs(row["beta_calibration"] - target) < 0.01, row
        assert abs(row["beta_held_out"] - target) < 0.05, row
    saved = torch.load(out, weights_only=True)["model"]
    tables = [v for k, v in saved.items() if k.endswith("router.budget_targets")]
    assert tables and all(sorted(t[t > 0].tolist()) == pytest.approx(list(TARGETS)) for t in tables)
    # Another run adds a target and keeps the file's others.
    again = str(tmp_path / "more.pth")
    calibrate("--target-beta", "0.55", "--images", "dge_synthetic_train", "--output", again, "MODEL.WEIGHTS", out)
    from detectron2.modeling import build_model

    from dge.config import load_config
    from dge.layers import stored_budgets

    model = build_model(load_config(DEMO, SIZE))
    model.load_state_dict(torch.load(again, weights_only=True)["model"])
    assert stored_budgets(model.backbone) == pytest.approx([0.4, 0.55, 0.7, 1.0])


def test_the_budget_survives_the_checkpoint_and_steers_the_predictor(calibrated):
    from dge.config import load_config
    from dge.detectron2.data import iter_images
    from dge.detectron2.engine import Predictor

    out = calibrated[1]
    images = [bgr for _, bgr in iter_images([], "dge_synthetic_val")]
    betas = {}
    for budget in ("0.0", "0.4"):
        cfg = load_config(DEMO, SIZE + ["MODEL.WEIGHTS", out, "MODEL.DGE.INFERENCE_BUDGET", budget])
        predictor = Predictor(cfg)
        betas[budget] = [float(predictor(img)["dge"]["beta"]) for img in images]
    assert abs(np.mean(betas["0.4"]) - 0.4) < 0.06, betas
    from detectron2.engine import DefaultPredictor  # detectron2's own predictor loads the budget alike

    plain = DefaultPredictor(load_config(DEMO, SIZE + ["MODEL.WEIGHTS", out, "MODEL.DGE.INFERENCE_BUDGET", "0.4"]))
    assert [float(plain(img)["dge"]["beta"]) for img in images] == pytest.approx(betas["0.4"], abs=1e-5)
    assert np.mean(betas["0.0"]) > 0.6, betas  # as trained: these routers keep most tokens
    with pytest.raises(ValueError, match=r"no calibrated offsets for β = 0.3 .*stored: \[0.4, 0.7, 1.0\]"):
        Predictor(load_config(DEMO, SIZE + ["MODEL.WEIGHTS", out, "MODEL.DGE.INFERENCE_BUDGET", "0.3"]))


def test_bad_inputs_stop_with_a_clear_message(trained, tmp_path, monkeypatch):
    from dge.config import load_config

    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match=r"--target-beta is a complexity ratio β in \(0, 1\]"):
            calibrate("--target-beta", bad, "--images", "dge_synthetic_train", "MODEL.WEIGHTS", trained)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"gave 0 image\(s\); calibration needs at least 2"):
        calibrate("--target-beta", "0.5", "--images", str(empty), "MODEL.WEIGHTS", trained)
    vanilla = _vanilla_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"has no DGE routers .* vanilla or ImageNet checkpoint"):
        calibrate("--target-beta", "0.5", "--images", "dge_synthetic_train", "MODEL.WEIGHTS", vanilla)
    # Below the all-coarsest routing: stored at the closest reachable β, with a warning.
    from dge.analysis import inference_budgets

    warned = []
    monkeypatch.setattr(inference_budgets.logger, "warning", warned.append)
    result = calibrate("--target-beta", "0.01", "--images", "dge_synthetic_train", "--output",
                       str(tmp_path / "low.pth"), "MODEL.WEIGHTS", trained)
    row = result["budgets"][0]
    assert not row["reached"] and row["beta_calibration"] > 0.05, row
    assert len(warned) == 1 and "out of reach" in warned[0] and "closest reachable β" in warned[0]
    from detectron2.modeling import build_model

    model = build_model(load_config(DEMO, SIZE + ["MODEL.DGE.INFERENCE_BUDGET", "0.5"])).eval()
    with pytest.raises(ValueError, match="no weights were loaded"):
        model([{"image": torch.zeros(3, 128, 160)}])
    with pytest.raises(ValueError, match=r"MODEL.DGE.INFERENCE_BUDGET is a complexity ratio β in \(0, 1\]"):
        build_model(load_config(DEMO, SIZE + ["MODEL.DGE.INFERENCE_BUDGET", "2.0"]))


def _vanilla_checkpoint(tmp_path) -> str:
    from detectron2.modeling import build_model

    from dge.config import load_config

    model = build_model(load_config(DEMO, SIZE + ["MODEL.DGE.ENABLED", "False"]))
    path = str(tmp_path / "vanilla.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _run_folder(folder, weights: str, *opts) -> str:
    """A train_net.py-like run folder: ``config.yaml`` (the demo config with ``opts``) and
    ``model_final.pth``."""
    from dge.config import load_config

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(load_config(DEMO, SIZE + list(opts)).dump())
    shutil.copy(weights, os.path.join(folder, "model_final.pth"))
    return str(folder)


def test_budget_curves_measure_the_three_families_in_one_run(trained, calibrated, tmp_path):
    import json

    from budget_curves import main

    dge_run = _run_folder(tmp_path / "dge", trained)
    budgets = shutil.copy(calibrated[1], os.path.join(dge_run, "budgets.pth"))  # 0.4 and 1.0 among its targets
    vanilla_run = _run_folder(tmp_path / "vanilla", _vanilla_checkpoint(tmp_path), "MODEL.DGE.ENABLED", "False")
    out = str(tmp_path / "curves")
    result = main(["--recalibrated", budgets, "--betas", "0.4", "1.0", "--trained", dge_run,
                   "--vanilla", vanilla_run, "--output", out, "--latency-runs", "3", "MODEL.DEVICE", "cpu"])
    assert set(result) == {"recalibrated", "trained", "resized"}
    low, full = result["recalibrated"]
    assert abs(low["beta"] - 0.4) < 0.1 and full["beta"] == pytest.approx(1.0, abs=0.01), result
    for family in result.values():
        assert all(p["backbone_ms"] > 0 and p["backbone_ms_in_eval"] > 0 and 0 <= p["bbox/AP"] <= 100
                   and "segm/AP" in p for p in family)
    small, native = result["resized"]
    # β = 1: the vanilla model's own size; β = 0.4: a smaller input whose block FLOPs are near 0.4 of it.
    assert native["min_size_test"] == 128 and native["beta"] == pytest.approx(1.0)
    assert small["min_size_test"] < 128 and abs(small["beta"] - 0.4) < 0.12, small
    assert small["beta_targets"] == [0.4] and native["beta_targets"] == [1.0]
    assert result["trained"][0]["label"] == "γ=0.5"
    with open(os.path.join(out, "budget_curves.json")) as f:
        assert json.load(f) == result
    assert os.path.getsize(os.path.join(out, "budget_curves.png")) > 10_000
    with pytest.raises(ValueError, match="MODEL.DGE.ENABLED is True; give the vanilla model"):
        main(["--vanilla", dge_run, "--output", out])
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        main(["--trained", str(tmp_path / "nowhere"), "--output", out])


def test_the_forward_timer_times_each_forward_after_the_warm_up():
    from dge.analysis.latency import ForwardTimer

    calls = []
    module = torch.nn.Linear(4, 4)
    module.register_forward_hook(lambda m, a, o: calls.append(1))
    with ForwardTimer(module, skip=2) as timer:
        for _ in range(5):
            module(torch.zeros(1, 4))
    module(torch.zeros(1, 4))  # outside the block: not timed
    assert len(timer.samples) == 3 and all(ms >= 0 for ms in timer.samples) and len(calls) == 6
    with pytest.raises(ValueError, match="no forward of Linear was timed"):
        ForwardTimer(module, skip=1).median()
