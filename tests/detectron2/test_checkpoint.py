"""A checkpoint write that fails (disk full) leaves no temporary file and the previous
checkpoint and ``last_checkpoint`` as they were; ``last_checkpoint`` is replaced by a rename."""
import errno
import os

import pytest
import torch

from dge.detectron2.engine import AtomicCheckpointer
from dge.detectron2.engine import checkpoint as checkpoint_module
from dge.layers import is_dge_state


def test_disk_full_leaves_no_temporary_file_and_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    ckpt.save("model_0000")

    def full(obj, f, *a, **k):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"


def test_last_checkpoint_is_replaced_by_a_rename(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    ckpt.save("model_0000")
    replaced = []
    real = os.replace
    monkeypatch.setattr(checkpoint_module.os, "replace", lambda a, b: (replaced.append(os.path.basename(b)), real(a, b)))
    ckpt.save("model_0001")
    assert replaced == ["model_0001.pth", "last_checkpoint"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0001.pth"


def test_weights_of_another_architecture_stop_before_training(data_root, tmp_path):
    import torchvision
    import train_net
    from train_helpers import run_args

    path = str(tmp_path / "resnet18.pth")
    torch.save(torchvision.models.resnet18().state_dict(), path)
    cfg = train_net.setup(run_args("MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "a")))
    trainer = train_net.Trainer(cfg)
    with pytest.raises(ValueError, match=r"gives the backbone 0 of its \d+ tensors: the file holds \d+ tensors such as \['conv1.weight'"):
        trainer.resume_or_load(resume=False)
    cfg = train_net.setup(run_args("MODEL.WEIGHTS", path, "MODEL.ALLOW_PARTIAL_WEIGHTS", "True", "OUTPUT_DIR", str(tmp_path / "b")))
    train_net.Trainer(cfg).resume_or_load(resume=False)  # allowed: starts from its initialisation


def test_a_file_of_the_same_model_still_loads(data_root, tmp_path):
    import train_net
    from train_helpers import run_args

    cfg = train_net.setup(run_args("OUTPUT_DIR", str(tmp_path / "a")))
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in train_net.Trainer(cfg).model.state_dict().items()}
    path = str(tmp_path / "own.pth")
    torch.save({"model": state}, path)
    cfg = train_net.setup(run_args("MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "b")))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())



def _saved_model(tmp_path, name, *opts):
    import train_net
    from detectron2.modeling import build_model
    from train_helpers import run_args

    cfg = train_net.setup(run_args(*opts, "OUTPUT_DIR", str(tmp_path / name)))
    path = str(tmp_path / f"{name}.pth")
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return path


def test_loading_says_what_kept_its_initialisation(data_root, tmp_path):
    import train_net
    from train_helpers import run_args

    vanilla = _saved_model(tmp_path, "vanilla", "MODEL.DGE.ENABLED", "False")
    three_classes = _saved_model(tmp_path, "three", "MODEL.ROI_HEADS.NUM_CLASSES", "3")
    summaries = []
    for path in (vanilla, three_classes):
        cfg = train_net.setup(run_args("MODEL.WEIGHTS", path, "OUTPUT_DIR", str(tmp_path / "run")))
        trainer = train_net.Trainer(cfg)
        trainer.resume_or_load(resume=False)
        summaries.append(trainer.checkpointer.last_load_summary)
    routers = sum(".router.gate." in k for k in trainer.model.state_dict())
    assert summaries[0].endswith(f"at initialisation: routers ({routers} tensors)"), summaries[0]
    assert "re-initialised for their shape: roi_heads.box_predictor.cls_score.weight (4, " in summaries[1], summaries[1]
    assert "at initialisation: heads (" in summaries[1]


def test_metrics_json_keeps_whole_lines_when_a_write_fails(tmp_path, monkeypatch):
    import json

    from detectron2.utils.events import EventStorage

    from dge.detectron2.engine import WholeLinesJSONWriter
    from dge.detectron2.engine import metrics as metrics_module

    path = str(tmp_path / "metrics.json")
    writer = WholeLinesJSONWriter(path)
    with EventStorage(0) as storage:
        storage.put_scalar("loss", 1.5, smoothing_hint=False)
        writer.write()
        storage.iter = 1
        storage.put_scalar("loss", 1.25, smoothing_hint=False)
        real = metrics_module.os.write

        def full(fd, data):
            real(fd, bytes(data[: len(data) // 2]))  # half a line reaches the disk
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(metrics_module.os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            writer.write()
    lines = open(path).read().splitlines()
    assert [json.loads(line) for line in lines] == [{"iteration": 0, "loss": 1.5}]


def test_the_trainer_writes_metrics_through_the_whole_lines_writer(data_root, tmp_path):
    import train_net
    from detectron2.utils.events import JSONWriter
    from train_helpers import run_args

    from dge.detectron2.engine import WholeLinesJSONWriter

    trainer = train_net.Trainer(train_net.setup(run_args("OUTPUT_DIR", str(tmp_path))))
    json_writers = [w for w in trainer.build_writers() if isinstance(w, JSONWriter)]
    assert len(json_writers) == 1 and isinstance(json_writers[0], WholeLinesJSONWriter)


def test_a_dge_checkpoint_evaluates_as_its_vanilla_twin_with_dge_disabled(data_root, tmp_path):
    """MODEL.DGE.ENABLED False on a DGE checkpoint: the blocks load (``.block.`` mapped), only
    the routers are unused, and the vanilla model computes what the DGE model computes with
    every region at φ = 1."""
    import train_net
    from detectron2.modeling import build_model
    from train_helpers import run_args

    from dge.layers.calibration import set_logit_offset
    from dge.detectron2.engine import AtomicCheckpointer

    cfg = train_net.setup(run_args("MODEL.DGE.ENABLED", "True", "OUTPUT_DIR", str(tmp_path / "dge")))
    torch.manual_seed(0)
    dge_model = build_model(cfg).eval()
    with torch.no_grad():
        for p in dge_model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained": unlike any initialisation
    path = str(tmp_path / "dge.pth")
    torch.save({"model": dge_model.state_dict()}, path)

    cfg = train_net.setup(run_args("MODEL.DGE.ENABLED", "False", "OUTPUT_DIR", str(tmp_path / "vanilla")))
    vanilla = build_model(cfg).eval()
    checkpointer = AtomicCheckpointer(vanilla)
    checkpointer.load(path, checkpointables=[])
    incompatible = checkpointer.last_incompatible  # what load() logs
    assert not incompatible.missing_keys
    unexpected = incompatible.unexpected_keys
    assert unexpected and all(".router." in k or is_dge_state(k) for k in unexpected)  # routers, options
    dge_state = dge_model.state_dict()
    for key, value in vanilla.state_dict().items():
        twin = key
        if key not in dge_state:
            stage, _, rest = key.partition(".blocks.")
            index, _, param = rest.partition(".")
            twin = f"{stage}.blocks.{index}.block.{param}"
        assert torch.equal(value, dge_state[twin]), key

    set_logit_offset(dge_model, [1e4])  # every region at the finest granularity
    x = torch.rand(1, 3, 96, 128) * 255
    with torch.no_grad():
        a = vanilla.backbone(vanilla.preprocess_image([{"image": x[0]}]).tensor)
        b = dge_model.backbone(dge_model.preprocess_image([{"image": x[0]}]).tensor)
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-4, name
