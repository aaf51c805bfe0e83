"""train_net.py end to end on the synthetic dataset: train, resume, evaluate, CPU DDP,
the budget loss, and clear failures."""
import os

import pytest
import torch
import train_net
from train_helpers import CONFIGS, read_metrics, run_args


def test_train_resume_and_evaluate(data_root, tmp_path):
    out = str(tmp_path / "run")
    cfg = train_net.setup(run_args("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", out))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    assert saved["iteration"] == 3
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"
    metrics = read_metrics(out)
    train_rows = [m for m in metrics if "total_loss" in m]
    assert train_rows and all("loss_budget" in m and "dge/beta" in m and "dge/share_phi4" in m for m in train_rows)
    assert "bbox/AP50" in metrics[-1] and "routing/beta" in metrics[-1]  # the final evaluation

    cfg2 = train_net.setup(run_args("SOLVER.MAX_ITER", "6", "OUTPUT_DIR", out, resume=True))
    trainer2 = train_net.Trainer(cfg2)
    trainer2.resume_or_load(resume=True)
    assert trainer2.start_iter == 4
    state = trainer2.optimizer.state_dict()["state"]
    saved_state = saved["trainer"]["_trainer"]["optimizer"]["state"]
    assert len(saved_state) > 0
    for k, v in saved_state.items():
        assert torch.equal(state[k]["exp_avg"], v["exp_avg"])
        assert state[k]["step"] == v["step"]
    trainer2.train()
    assert [m for m in read_metrics(out) if "total_loss" in m][-1]["iteration"] == 5

    results = train_net.main(run_args("MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out, eval_only=True))
    assert set(results) >= {"bbox", "segm", "routing"}
    assert 0 <= results["bbox"]["AP50"] <= 100
    assert 0.0 < results["routing"]["beta"] <= 1.1


def test_paper_config_resolves_to_the_paper_settings():
    from dge.config import load_config

    cfg = load_config(os.path.join(CONFIGS, "mask_rcnn_pvt_s_dge_1x.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "DGERCNN"
    assert cfg.SOLVER.MAX_ITER == 90000 and tuple(cfg.SOLVER.STEPS) == (60000, 80000)
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 1e-4
    assert cfg.SOLVER.OPTIMIZER == "AdamW" and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    assert cfg.MODEL.DGE.ENABLED and cfg.MODEL.DGE.BUDGET == 0.5
    assert list(cfg.MODEL.DGE.GRANULARITIES) == [1, 2, 4]
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == (768,)
    assert cfg.MODEL.PVT.SIZE == "small" and cfg.MODEL.PVT.ATTENTION == "sr"


def test_budget_loss_moves_beta_toward_a_low_budget(data_root, tmp_path):
    out = str(tmp_path / "budget")
    cfg = train_net.setup(run_args(
        "SOLVER.MAX_ITER", "25", "SOLVER.BASE_LR", "0.0001", "MODEL.DGE.ROUTER_LR_FACTOR", "200.0",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "MODEL.DGE.BUDGET", "0.25", "OUTPUT_DIR", out,
    ))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    betas = [v for v, _ in trainer.storage.history("dge/beta").values()]
    assert len(betas) == 25
    assert betas[0] > 0.8  # the routers start by favouring φ = 1
    late = sum(betas[-5:]) / 5
    assert late < 0.45, betas  # measured: 0.97 -> 0.29 (mean of the last 5) toward γ = 0.25


def test_bad_input_ends_with_a_clear_message(data_root, tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="'no_such_dataset' is not registered"):
        train_net.main(run_args("DATASETS.TRAIN", "('no_such_dataset',)", "OUTPUT_DIR", str(tmp_path)))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nowhere"))
    from detectron2.data.datasets import register_coco_instances

    register_coco_instances("dge_test_missing_coco", {}, str(tmp_path / "nowhere/coco/ann.json"), str(tmp_path / "nowhere/coco/img"))
    with pytest.raises(FileNotFoundError, match="expects its json_file at .*nowhere/coco/ann.json"):
        train_net.main(run_args("DATASETS.TRAIN", "('dge_test_missing_coco',)", "OUTPUT_DIR", str(tmp_path)))
    with pytest.raises(KeyError, match="Non-existent config key: MODEL.DGE.BUDGT .*did you mean MODEL.DGE.BUDGET"):
        train_net.setup(run_args("MODEL.DGE.BUDGT", "0.3", "OUTPUT_DIR", str(tmp_path)))


def test_corrupt_image_is_named(data_root, tmp_path):
    from dge.detectron2.data import CheckedDatasetMapper

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cfg = train_net.setup(run_args("OUTPUT_DIR", str(tmp_path)))
    mapper = CheckedDatasetMapper(cfg, is_train=True)
    with pytest.raises(RuntimeError, match="could not read image .*broken.png"):
        mapper({"file_name": str(bad), "height": 8, "width": 8, "annotations": []})


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(data_root, tmp_path):
    out = str(tmp_path / "nan")
    cfg = train_net.setup(run_args("SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "1", "OUTPUT_DIR", out))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    model.roi_heads.box_predictor.register_forward_hook(
        lambda m, i, o: (o[0] * float("nan"), o[1]) if trainer.iter >= 1 else o
    )
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN at iteration=1"):
        trainer.train()
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_0000000.pth"
    assert torch.load(os.path.join(out, "model_0000000.pth"), weights_only=False)["iteration"] == 0


def test_a_crash_while_saving_never_leaves_a_half_written_latest_checkpoint(tmp_path, monkeypatch):
    from dge.detectron2.engine import AtomicCheckpointer

    model = torch.nn.Linear(2, 2)
    ckpt = AtomicCheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000")

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0001")
    assert ckpt.get_checkpoint_file().endswith("model_0000.pth")
    assert not os.path.exists(tmp_path / "model_0001.pth")
