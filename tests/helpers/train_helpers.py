"""Helpers of the train_net.py tests: command lines and the metrics a run writes."""
import json
import os

import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import repo
from model_helpers import recorded

CONFIGS = str(repo.CONFIGS)


def train_args(config: str, fast, *extra, eval_only: bool = False, resume: bool = False):
    """train_net.py's parsed arguments for ``config`` with the ``fast`` overrides, then ``extra``."""
    argv = ["--config-file", config] + (["--eval-only"] if eval_only else []) + (["--resume"] if resume else [])
    return default_argument_parser().parse_args(argv + list(fast) + list(extra))


def one_training_step(cfg):
    """(losses, the RoutingRecord, names of trainable parameters without a gradient) of one
    training step of ``build_model(cfg)`` on the first batch of its train loader."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    with EventStorage():
        losses, record = recorded(model, batch)
    sum(losses.values()).backward()
    return losses, record, [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def read_metrics(output_dir: str):
    """The rows of ``output_dir/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


DEMO = os.path.join(CONFIGS, "demo_pvt_dge_synthetic.yaml")
# A small, fast variant of the demo: 128×160 inputs, 2 images per batch, no workers.
FAST = [
    "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2", "SOLVER.STEPS", "()",
    "DATALOADER.NUM_WORKERS", "0", "MODEL.DEVICE", "cpu", "SEED", "0",
]


def run_args(*extra, eval_only=False, resume=False):
    return train_args(DEMO, FAST, *extra, eval_only=eval_only, resume=resume)
