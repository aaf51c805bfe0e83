"""--resume continues exactly: a run interrupted after a checkpoint and resumed ends with the
weights and optimizer state of the uninterrupted run, bit for bit (one process, and two
gloo processes, whose weights stay identical and change), also with another number of
data-loader workers."""
import json
import os
import shutil

import torch
import train_net
from repo import SMALL_DATA
from train_helpers import run_args

from dge.detectron2.compat import launch
from dge.detectron2.data import register_synthetic_datasets


def _train(out, resume, *extra):
    cfg = train_net.setup(
        run_args(
            "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()", "OUTPUT_DIR", out, *extra,
            resume=resume,
        )
    )
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=resume)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return before, list(trainer.model.parameters())


def _interrupted_copy(full, out):
    """What a run killed after its iteration-2 checkpoint leaves behind."""
    os.makedirs(out)
    shutil.copy(os.path.join(full, "model_0000001.pth"), out)
    with open(os.path.join(out, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")


def _assert_same_final(a, b):
    x = torch.load(os.path.join(a, "model_final.pth"), weights_only=False)
    y = torch.load(os.path.join(b, "model_final.pth"), weights_only=False)
    assert x["iteration"] == y["iteration"] == 3
    assert x["model"].keys() == y["model"].keys()
    differing = [k for k in x["model"] if not torch.equal(x["model"][k], y["model"][k])]
    assert not differing, f"{len(differing)} of {len(x['model'])} tensors differ, e.g. {differing[:3]}"
    for name in ("exp_avg", "exp_avg_sq"):
        sx, sy = x["trainer"]["_trainer"]["optimizer"]["state"], y["trainer"]["_trainer"]["optimizer"]["state"]
        assert sx.keys() == sy.keys()
        assert all(torch.equal(sx[k][name], sy[k][name]) for k in sx)
    assert x["trainer"]["data_seed"] == y["trainer"]["data_seed"]


def test_resume_is_exact_on_one_process(data_root, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    _train(full, False)
    _interrupted_copy(full, resumed)
    _train(resumed, True, "DATALOADER.NUM_WORKERS", "1")
    _assert_same_final(full, resumed)


def _ddp_train(data_root, out, resume):
    """Each rank's weights after training (a checksum) and how many tensors the run changed, in ranks.json."""
    from detectron2.utils import comm

    register_synthetic_datasets(root=data_root, **SMALL_DATA)
    before, after = _train(out, resume, "SOLVER.IMS_PER_BATCH", "4")
    changed = sum(int(not torch.equal(a, b)) for a, b in zip(after, before))
    checksum = torch.cat([p.detach().flatten() for p in after]).double().sum().item()
    results = comm.all_gather((comm.get_rank(), checksum, changed))
    if comm.is_main_process():
        with open(os.path.join(out, "ranks.json"), "w") as f:
            json.dump(results, f)


def test_resume_is_exact_on_two_gloo_processes(data_root, tmp_path):
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch(_ddp_train, 2, dist_url="auto", args=(data_root, full, False))
    _interrupted_copy(full, resumed)
    launch(_ddp_train, 2, dist_url="auto", args=(data_root, resumed, True))
    _assert_same_final(full, resumed)
    for out in (full, resumed):
        ranks = json.load(open(os.path.join(out, "ranks.json")))
        assert sorted(r[0] for r in ranks) == [0, 1]
        assert ranks[0][1] == ranks[1][1] and ranks[0][2] > 0  # identical on both ranks, and trained
