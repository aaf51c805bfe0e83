"""What a user or a service meets when something is off: each call's own β from a shared
predictor, dge's lines in the training log, checkpoints of other DGE options refused, an
interrupted final checkpoint written on resume, no checkpoint with NaN saved or loaded and a
diverged run naming its last finite one, one output per input, budgets the routers cannot
reach said at the start, and errors that name the file and the cause."""
import builtins
import logging
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

import train_net
from dge.layers.calibration import randomize_routers, set_logit_offset
from dge.config import load_config
from detectron2.engine import DefaultPredictor
from dge.detectron2.engine import AtomicCheckpointer, Predictor
from dge.detectron2.engine.checkpoint import first_nonfinite
import dge.files
from repo import load_tool
from train_helpers import DEMO, FAST, run_args


def _demo_model(*opts):
    torch.manual_seed(0)
    return build_model(load_config(DEMO, FAST + list(opts)))


def test_a_shared_predictor_gives_each_call_its_own_beta(tmp_path):
    cfg = train_net.setup(run_args("OUTPUT_DIR", str(tmp_path)))
    predictor = Predictor(cfg)
    with torch.no_grad():
        randomize_routers(predictor.model, seed=0)
        set_logit_offset(predictor.model, [-3.0])  # below the initial fine bias: mixed routing
    rng = np.random.default_rng(4)
    images = [np.full((96, 128, 3), 120, np.uint8), rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)]
    alone = [predictor(im) for im in images]
    betas = [float(out["dge"]["beta"]) for out in alone]
    assert abs(betas[0] - betas[1]) > 0.02, betas
    seen = [[], []]

    def work(k):
        for _ in range(20):
            out = predictor(images[k])
            seen[k].append((float(out["dge"]["beta"]), out["instances"].pred_boxes.tensor))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        assert [b for b, _ in seen[k]] == [pytest.approx(betas[k], abs=1e-6)] * 20
        assert all(torch.allclose(boxes, alone[k]["instances"].pred_boxes.tensor, atol=1e-4) for _, boxes in seen[k])


def test_the_training_log_holds_dges_lines(data_root, tmp_path):
    out = str(tmp_path / "run")
    train_net.main(run_args("SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", out))
    log = open(os.path.join(out, "log.txt")).read()
    assert "dge.detectron2.data.validation INFO: dataset 'dge_synthetic_train'" in log  # the validation summary
    assert "dge.detectron2.engine.routing_stats INFO: iter 1: β " in log and "(stages " in log  # the routing line
    assert "running on the CPU" in log


OTHER_PHI = ("MODEL.DGE.GRANULARITIES", "[2, 4, 8]")  # the demo's Φ is {1, 2, 4}: the same router shapes
BOTH_SETS = (r"trained with DGE granularities \[1, 2, 4\], region size 4.*"
             r"this model has granularities \[2, 4, 8\], region size 8")


def _through_tool(name, *args):
    def load(cfg_opts, tmp_path):
        load_tool(name).main(["--config-file", DEMO, *args, "--output", str(tmp_path / name), *cfg_opts])
    return load


LOADERS = {  # how each loader is given MODEL.WEIGHTS: (config overrides, tmp_path) -> None
    "train_net --eval-only": lambda opts, tmp: train_net.main(run_args(*opts, "OUTPUT_DIR", str(tmp), eval_only=True)),
    "dge.engine.Predictor": lambda opts, tmp: Predictor(load_config(DEMO, FAST + list(opts))),
    "DefaultPredictor": lambda opts, tmp: DefaultPredictor(load_config(DEMO, FAST + list(opts))),
    "tools/predict.py": _through_tool("predict", "--input", "skimage:chelsea"),
    "tools/visualize_gates.py": _through_tool("visualize_gates", "--input", "skimage:chelsea"),
    "tools/export_model.py": _through_tool("export_model", "--what", "backbone", "--format", "exported"),
}


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory):
    """A demo checkpoint (Φ {1, 2, 4}) and a calibrate_budget.py file of it."""
    folder = tmp_path_factory.mktemp("weights")
    model = _demo_model()
    AtomicCheckpointer(model, save_dir=str(folder)).save("demo")
    dge.files.atomic_save({"model": model.state_dict(), "budgets": []}, str(folder / "demo_budgets.pth"))
    return folder


@pytest.mark.parametrize(  # a calibrated file through one loader: its options are in its model state, as in any
    "loader, weights", [(name, "demo.pth") for name in LOADERS] + [("train_net --eval-only", "demo_budgets.pth")]
)
def test_weights_of_another_granularity_set_are_refused_by_every_loader(loader, weights, demo_weights, tmp_path):
    opts = ("MODEL.WEIGHTS", str(demo_weights / weights), *OTHER_PHI)
    with pytest.raises(RuntimeError, match=BOTH_SETS + ".*MODEL.ALLOW_PARTIAL_WEIGHTS True"):
        LOADERS[loader](opts, tmp_path)


def test_weights_of_other_options_load_when_allowed_keeping_the_routers(demo_weights, caplog):
    other = _demo_model(*OTHER_PHI)
    routers = {k: v.clone() for k, v in other.state_dict().items() if ".router." in k}
    caplog.set_level(logging.WARNING)
    AtomicCheckpointer(other, allow_partial=True).load(str(demo_weights / "demo.pth"))
    assert "loading all but the routers" in caplog.text
    assert all(torch.equal(other.state_dict()[k], v) for k, v in routers.items())
    predictor = Predictor(load_config(DEMO, FAST + ["MODEL.WEIGHTS", str(demo_weights / "demo.pth"), *OTHER_PHI,
                                                    "MODEL.ALLOW_PARTIAL_WEIGHTS", "True"]))
    assert predictor.model.backbone.bottom_up.stages[0].blocks[0].granularities == (2, 4, 8)
    AtomicCheckpointer(_demo_model()).load(str(demo_weights / "demo.pth"))  # the same options load


def test_timm_load_state_dict_refuses_other_options_and_says_when_a_file_has_none(caplog):
    import timm

    weights = timm.create_model("pvt_tiny_dge").state_dict()
    other = timm.create_model("pvt_tiny_dge", dge={"granularities": (2, 4, 8)})
    for strict in (True, False):
        with pytest.raises(RuntimeError, match=BOTH_SETS):
            other.load_state_dict(weights, strict=strict)
    old = {k: v for k, v in weights.items() if not k.endswith("._extra_state")}  # written before the options
    caplog.set_level(logging.WARNING)
    assert not other.load_state_dict(old).missing_keys
    assert caplog.text.count("carry no DGE options") == 1  # one line per load, not one per block


def test_a_run_stopped_while_writing_model_final_writes_it_on_resume(data_root, tmp_path):
    out = tmp_path / "run"
    args = ("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out))
    cfg = train_net.setup(run_args(*args))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    final = torch.load(out / "model_final.pth", weights_only=False)
    # kill -9 while model_final.pth was written: the iteration-3 checkpoint is the last complete one.
    os.remove(out / "model_final.pth")
    (out / "model_final.pth.tmp").write_bytes(b"PK\x03\x04 partial")
    (out / "last_checkpoint").write_text("model_0000003.pth")
    trainer = train_net.Trainer(train_net.setup(run_args(*args, resume=True)))
    trainer.resume_or_load(resume=True)
    assert not (out / "model_final.pth.tmp").exists()
    written = torch.load(out / "model_final.pth", weights_only=False)
    assert written["iteration"] == final["iteration"] == 3
    assert all(torch.equal(written["model"][k], v) for k, v in final["model"].items())
    log = (out / "log.txt").read_text()
    assert "model_final.pth.tmp: a checkpoint write that did not finish" in log
    assert "model_final.pth is missing" in log


def test_inputs_of_the_same_name_get_outputs_of_their_own(tmp_path, caplog):
    from dge.detectron2.data import iter_images

    for ext in ("png", "jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"x.{ext}")
    with caplog.at_level(logging.WARNING):
        names = [name for name, _ in iter_images([str(tmp_path), str(tmp_path / "x.png")])]
    assert names == ["x", "x_2", "x_3"]
    assert caplog.text.count("named apart") == 1


@pytest.mark.parametrize(
    "opts, message",
    [
        (("MODEL.DGE.GRANULARITIES", "[3]"), r"\[3\] is one choice: the DGE blocks have no router, β stays 0\.2"),
        (("MODEL.DGE.BUDGET", "0.01"), r"BUDGET 0\.01 is below β 0\.\d+ of every region at the coarsest φ of \[1, 2, 4"),
        (("MODEL.DGE.GRANULARITIES", "[2, 4]", "MODEL.DGE.BUDGET", "0.9"), r"BUDGET 0\.9 is above β 0\.\d+ .* finest"),
    ],
)
def test_a_budget_the_routers_cannot_reach_is_said(opts, message):
    (warning,) = _demo_model(*opts).budget_warnings((128, 160))  # one line
    assert re.search(message, warning), warning
    assert _demo_model().budget_warnings((128, 160)) == []


def test_an_annotation_file_that_is_not_json_is_named(tmp_path):
    from detectron2.data.datasets import register_coco_instances

    from dge.detectron2.data.loader import dataset_records

    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    register_coco_instances("dge_test_broken_json", {}, str(path), str(tmp_path))
    with pytest.raises(ValueError, match=f"annotation file {path} of dataset dge_test_broken_json is not valid JSON"):
        dataset_records(["dge_test_broken_json"])


def test_a_whole_model_export_through_torch_export_says_torchscript(tmp_path, capsys):
    import export_model

    out = str(tmp_path / "export")
    with pytest.raises(SystemExit):
        export_model.main(["--config-file", DEMO, "--format", "exported", "--check", "skimage:coffee", "--output", out])
    message = r"a whole detectron2 model is not exported as 'exported'.*use --format torchscript"
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(out)  # stopped before anything was traced or written


def test_a_full_disk_names_the_checkpoint_and_the_cause(tmp_path, monkeypatch):
    real = builtins.open
    # Writes of the checkpoint go to /dev/full: the real ENOSPC of a full disk.
    full = lambda p, mode: real("/dev/full" if p.endswith(".tmp") else p, mode)  # noqa: E731
    monkeypatch.setattr(dge.files, "open", full, raising=False)
    with pytest.raises(OSError, match=f"could not write {tmp_path / 'model_0001.pth'}: No space left on device"):
        AtomicCheckpointer(torch.nn.Linear(64, 64), save_dir=str(tmp_path)).save("model_0001")


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": torch.nn.Linear(64, 64).state_dict()}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(RuntimeError, match=f"cannot read the checkpoint {path} \\(truncated, or not a checkpoint\\)"):
        AtomicCheckpointer(torch.nn.Linear(64, 64)).load(str(path))


def test_a_model_with_nan_is_never_saved_nor_loaded(tmp_path, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    checkpointer = AtomicCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000001")
    with torch.no_grad():
        model[1].weight[3] = float("nan")
    with caplog.at_level(logging.ERROR, logger="fvcore.common.checkpoint"):
        checkpointer.save("model_0000002")
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert f"not saving model_0000002.pth: 1.weight holds NaN or inf (the run diverged); the last finite " \
           f"checkpoint is {tmp_path / 'model_0000001.pth'}" in caplog.text
    path = tmp_path / "diverged.pth"
    torch.save({"model": model.state_dict()}, path)
    with pytest.raises(ValueError, match=rf"the checkpoint {path} holds NaN or inf \(first in 1.weight\)"):
        AtomicCheckpointer(model).load(str(path))


def test_a_run_that_diverges_names_its_last_finite_checkpoint(data_root, tmp_path):
    out = tmp_path / "run"
    args = ("SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "1", "SOLVER.BASE_LR", "30.0",
            "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out))
    with pytest.raises(FloatingPointError):
        train_net.main(run_args(*args))
    last = out / (out / "last_checkpoint").read_text()
    assert f"the last finite checkpoint is {last}" in (out / "log.txt").read_text()
    AtomicCheckpointer(torch.nn.Linear(1, 1), allow_partial=True).load(str(last))  # finite: it loads


def test_a_run_that_diverges_before_its_first_checkpoint_resumes_from_the_start(data_root, tmp_path):
    """The issue's case (BASE_LR 30, a checkpoint every 2 iterations): the model is NaN at the
    first save, so nothing is written, and --resume at a safe rate trains from the start."""
    out = tmp_path / "run"
    common = ("SOLVER.CHECKPOINT_PERIOD", "2", "SOLVER.WARMUP_ITERS", "0", "TEST.EVAL_PERIOD", "0",
              "OUTPUT_DIR", str(out))
    with pytest.raises(FloatingPointError):
        train_net.main(run_args("SOLVER.MAX_ITER", "8", "SOLVER.BASE_LR", "30.0", *common))
    assert not (out / "last_checkpoint").exists() and not list(out.glob("*.pth"))
    assert "the last finite checkpoint is none" in (out / "log.txt").read_text()
    train_net.main(run_args("SOLVER.MAX_ITER", "2", "SOLVER.BASE_LR", "0.001", *common, resume=True))
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert first_nonfinite(torch.load(out / "model_final.pth", weights_only=False)["model"]) is None


def test_one_run_per_output_dir(tmp_path):
    """A folder another live process runs in stops train_net.py's setup with that process named;
    a lock left by a process that is gone is taken over with one line; this process again is a
    no-op."""
    from dge.files import RUN_LOCK, take_run_lock

    host, lock = socket.gethostname(), tmp_path / RUN_LOCK
    assert take_run_lock(str(tmp_path)) == take_run_lock(str(tmp_path)) == str(lock)
    lock.write_text(f"{host} 1")  # pid 1 is alive
    with pytest.raises(RuntimeError, match=rf"{tmp_path} is in use by process 1 on {host} .*another OUTPUT_DIR"):
        train_net.setup(run_args("OUTPUT_DIR", str(tmp_path)))
    assert not (tmp_path / "config.yaml").exists()  # stopped before it wrote anything
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{host} {gone.stdout.strip()}")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("dge.files").addHandler(handler)
    try:
        take_run_lock(str(tmp_path))
    finally:
        logging.getLogger("dge.files").removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        f"{tmp_path}: taking over the run lock of process {gone.stdout.strip()}, which is gone (a stopped run)"]
    assert lock.read_text() == f"{host} {os.getpid()}"
