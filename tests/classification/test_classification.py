"""tools/train_classifier.py (dge.classification) on a generated ImageFolder tree: training
with the budget loss, evaluation (top-1, top-5, GFLOPs, β), exact resume, two gloo processes,
the ablation switches, and clear failures that lose nothing."""
import copy
import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dge.classification import UnreadableImageError, build_model, parse_args, run, trainer
from dge.layers import dge_modules

CLASSES = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
# pvt_tiny_dge at 64×64: 16 regions of 4×4 tokens in stage 1; 2 steps of 6 images per epoch.
FAST = [
    "--model", "pvt_tiny_dge", "--input-size", "64", "--batch-size", "6", "--workers", "0",
    "--aa", "", "--reprob", "0", "--warmup-epochs", "0", "--print-freq", "100", "--device", "cpu",
]


def write_image_folder(root, per_class=(("train", 4), ("val", 2)), size=32, seed=0):
    """root/{train,val}/{red,green,blue}/*.png: noisy images of the class colour."""
    rng = np.random.default_rng(seed)
    for split, n in per_class:
        for name, colour in CLASSES.items():
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = np.asarray(colour)[None, None] + rng.normal(0, 40, (size, size, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def args_for(data, out, *extra):
    return parse_args(["--data-path", data, "--output-dir", str(out)] + FAST + list(extra))


def quiet(msg):
    pass


def read_log(out):
    """The evaluation rows of metrics.json (detectron2's writer)."""
    with open(os.path.join(out, "metrics.json")) as f:
        return [row for row in map(json.loads, f) if "classification/acc1" in row]


def saved(out):
    return torch.load(os.path.join(out, "checkpoint.pth"), map_location="cpu", weights_only=True)


class Interrupt(Exception):
    pass


def test_training_evaluates_and_resumes_exactly_where_it_stopped(data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    results = run(args_for(data, straight, "--epochs", "2"), log=quiet)
    assert 0 <= results["acc1"] <= results["acc5"] == 100.0  # 3 classes: top-5 covers all
    assert results["images"] == 6 and results["epoch"] == 1
    assert 0.0 < results["beta"] <= 1.01
    assert {"beta_stage1", "beta_stage4", "share_phi1", "share_phi2", "share_phi4"} <= set(results)
    assert results["gflops"] == pytest.approx(results["static_gflops"], rel=0.02)  # fresh routers: φ = 1
    rows = read_log(straight)
    assert [r["epoch"] for r in rows] == [0, 1] and [r["iteration"] for r in rows] == [2, 4]
    assert all("train/loss_budget" in r and "routing/beta" in r for r in rows)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(straight))

    # The same run, stopped before its second epoch, then resumed.
    stopped = tmp_path / "stopped"
    original = trainer.train_one_epoch

    def stop_at_epoch_1(*args, **kwargs):
        if kwargs["epoch"] == 1:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", stop_at_epoch_1)
    with pytest.raises(Interrupt):
        run(args_for(data, stopped, "--epochs", "2"), log=quiet)
    first = saved(stopped)
    assert (first["epoch"], first["step"]) == (0, 2)

    seen = {}

    def record_start(model, loader, optimizer, *args, **kwargs):
        seen.update(epoch=kwargs["epoch"], step=kwargs["step"], optimizer=copy.deepcopy(optimizer.state_dict()))
        return original(model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", record_start)
    resumed = run(args_for(data, stopped, "--epochs", "2", "--resume"), log=quiet)
    assert (seen["epoch"], seen["step"]) == (1, 2)
    for key, state in first["optimizer"]["state"].items():
        assert torch.equal(seen["optimizer"]["state"][key]["exp_avg"], state["exp_avg"])
        assert torch.equal(seen["optimizer"]["state"][key]["step"], state["step"])
    # Same data order, augmentations, mixup and Gumbel noise: the very same weights.
    a, b = saved(straight)["model"], saved(stopped)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["acc1"] == results["acc1"] and resumed["beta"] == results["beta"]
    assert [r["epoch"] for r in read_log(stopped)] == [0, 1]

    evaluate_only = ["--data-path", data, "--eval-only", "--weights", str(straight / "checkpoint.pth")] + FAST
    assert run(parse_args(evaluate_only), log=quiet) == dict(results, epoch=None)


@pytest.mark.parametrize("budget", [0.25, 1.0])
def test_budget_loss_moves_beta_toward_the_budget(data, tmp_path, budget):
    # 12 steps of 4 images at a high, nearly constant lr (6.25e-3 .. 5e-3) with λ = 10.
    out = tmp_path / "budget"
    args = args_for(data, out, "--epochs", "4", "--batch-size", "4", "--lr", "0.2", "--min-lr", "0.005",
                    "--budget", str(budget), "--budget-weight", "10", "--mixup", "0", "--cutmix", "0",
                    "--drop-path", "0")
    results = run(args, log=quiet)
    betas = [r["train/beta"] for r in read_log(out)]
    assert betas[0] > 0.85, betas  # the routers start by favouring φ = 1 (p = 0.95)
    if budget == 0.25:  # measured: 0.95, 0.67, 0.54, 0.44 (seeds 1-3 end at 0.38-0.55)
        assert betas[-1] < 0.65 and betas[0] - betas[-1] > 0.3, betas
        assert results["beta"] < 0.65  # inference (argmax routing) follows
        assert results["gflops"] < 0.75 * results["static_gflops"]
    else:  # measured: 0.96, 0.87, 0.85, 0.86 (seed 3 ends at 0.80)
        assert betas[-1] > 0.75 and results["beta"] > 0.75, betas


def test_two_gloo_processes_train_the_same_weights_and_share_the_evaluation(data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp")
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(data, out, port), nprocs=2, join=True, start_method="spawn"
    )
    results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert results[0]["checksum"] == results[1]["checksum"]
    assert results[0]["eval"] == results[1]["eval"]
    assert results[0]["eval"]["images"] == 6  # 3 + 3, none counted twice
    assert saved(out)["step"] == 2  # 12 images, 6 per step over both processes (3 each)


def _ddp_worker(rank, data, out, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = parse_args(["--data-path", data, "--output-dir", out, "--epochs", "1", "--mixup", "0", "--cutmix", "0"]
                      + FAST)
    captured = {}
    original = trainer.evaluate

    def keep_model(model, *a, **k):
        captured["model"] = model
        return original(model, *a, **k)

    trainer.evaluate = keep_model
    results = run(args, log=quiet)
    checksum = sum(p.detach().double().sum().item() for p in captured["model"].parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"checksum": checksum, "eval": results}, f)


def test_ablation_switches_reach_every_dge_block(data):
    def blocks(*extra):
        args = parse_args(["--data-path", data] + FAST + list(extra))
        model = build_model(args.model, 3, args.input_size, 0.0, trainer._dge_options(args))
        return dge_modules(model)

    assert blocks("--no-dge") == []
    assert {(b.granularities, b.routing, b.options.estimator) for b in blocks()} == {((1, 2, 4), "region", "paper")}
    assert {(b.granularities, b.region_size) for b in blocks("--granularities", "0", "1")} == {((0, 1), 1)}
    assert {b.routing for b in blocks("--routing", "layer")} == {"layer"}
    assert {b.options.estimator for b in blocks("--estimator", "official")} == {"official"}


@pytest.mark.parametrize(
    "extra, shares",
    [
        (["--granularities", "0", "1"], {"share_phi0", "share_phi1"}),  # Table 1: skip or keep a token
        (["--model", "deit_tiny_dge", "--routing", "layer", "--estimator", "official"],
         {"share_phi1", "share_phi2", "share_phi4"}),
        (["--model", "dpvt_tiny_dge", "--granularities", "1", "2"], {"share_phi1", "share_phi2"}),
        (["--no-dge"], set()),
    ],
    ids=["phi-0-1", "deit-layer-official", "dpvt-phi-1-2", "vanilla"],
)
def test_every_family_and_ablation_switch_trains_and_reports(data, tmp_path, extra, shares):
    results = run(args_for(data, tmp_path, "--epochs", "1", *extra), log=quiet)
    assert {k for k in results if k.startswith("share_phi")} == shares
    if shares:
        layers = len([k for k in results if k.startswith("beta_layer")])
        assert layers == (12 if "deit_tiny_dge" in extra else 8)  # DeiT-Ti: 12 blocks; PVT-Ti: 2 per stage
        assert "train/loss_budget" in read_log(tmp_path)[0]
    else:  # vanilla: no β, and its GFLOPs are its fvcore count
        assert "beta" not in results and results["gflops"] == pytest.approx(results["static_gflops"])
        assert "train/loss_budget" not in read_log(tmp_path)[0]


def test_command_line_errors_name_the_bad_value(data, capsys):
    cases = [
        (["--model", "pvt_tiny", "--budget", "0.25"],
         "--budget: only for models with DGE blocks; 'pvt_tiny' has none (use pvt_tiny_dge)"),
        (["--no-dge", "--routing", "layer"], "--no-dge builds it without DGE blocks"),
        (["--routing", "column"], "invalid choice: 'column'"),
        (["--budget", "1.5"], "must be in [0, 1]; got 1.5"),
        (["--granularities", "-1"], "must be an integer >= 0 (0: skip the region); got -1"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--model", "resnet50"], "invalid choice: 'resnet50'"),
        (["--eval-only"], "--eval-only needs the model to evaluate"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            parse_args(["--data-path", data] + extra)
        assert message in capsys.readouterr().err, extra
    with pytest.raises(ValueError, match="granularities must divide the region size 4; got 3"):
        run(args_for(data, "unused", "--granularities", "1", "3", "--region-size", "4"), log=quiet)
    with pytest.raises(ValueError, match="mixup / cutmix need an even batch per process; got 5"):
        run(args_for(data, "unused", "--batch-size", "5"), log=quiet)
    with pytest.raises(ValueError, match="train/ has 12 images, fewer than one batch of 20"):
        run(args_for(data, "unused", "--batch-size", "20"), log=quiet)


def test_missing_or_empty_folders_fail_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"--data-path '.*nowhere' is not a folder"):
        run(args_for(str(tmp_path / "nowhere"), out), log=quiet)
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"flat/train' does not exist: --data-path must hold train/ and val/"):
        run(args_for(str(tmp_path / "flat"), out), log=quiet)
    for name in CLASSES:
        (tmp_path / "empty" / "train" / name).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images in '.*empty/train'"):
        run(args_for(str(tmp_path / "empty"), out), log=quiet)
    root = write_image_folder(tmp_path / "one_empty", per_class=(("train", 2), ("val", 1)))
    shutil.rmtree(os.path.join(root, "val", "green"))
    os.makedirs(os.path.join(root, "val", "green"))
    with pytest.raises(FileNotFoundError, match=r"class folders without images in '.*val': \['green'\]"):
        run(args_for(root, out), log=quiet)
    shutil.rmtree(os.path.join(root, "val", "green"))
    with pytest.raises(ValueError, match=r"differ from the training classes: missing \['green'\]"):
        run(args_for(root, out), log=quiet)
    assert not out.exists()


def test_corrupt_image_names_the_file_and_keeps_the_last_checkpoint(data, tmp_path):
    root = shutil.copytree(data, tmp_path / "data")
    out = tmp_path / "out"
    one_step = ["--batch-size", "12", "--mixup", "0", "--cutmix", "0"]  # one step per epoch
    run(args_for(str(root), out, "--epochs", "1", *one_step), log=quiet)
    before = (out / "checkpoint.pth").read_bytes()
    bad = root / "train" / "green" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    with pytest.raises(UnreadableImageError, match=r"could not read image '.*green/3\.png'"):
        run(args_for(str(root), out, "--epochs", "2", "--resume", *one_step), log=quiet)
    assert (out / "checkpoint.pth").read_bytes() == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert [r["epoch"] for r in read_log(out)] == [0]
    with pytest.raises(ValueError, match=r"holds another network: it was trained with --model 'pvt_tiny_dge'"):
        run(args_for(str(root), out, "--epochs", "2", "--resume", "--model", "deit_tiny_dge", *one_step), log=quiet)
