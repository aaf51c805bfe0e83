"""Helpers of the train_net.py tests: command lines and the metrics a run writes."""
import json
import os

from detectron2.engine import default_argument_parser

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def train_args(config: str, fast, *extra, eval_only: bool = False, resume: bool = False):
    """train_net.py's parsed arguments for ``config`` with the ``fast`` overrides, then ``extra``."""
    argv = ["--config-file", config] + (["--eval-only"] if eval_only else []) + (["--resume"] if resume else [])
    return default_argument_parser().parse_args(argv + list(fast) + list(extra))


def read_metrics(output_dir: str):
    """The rows of ``output_dir/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]
