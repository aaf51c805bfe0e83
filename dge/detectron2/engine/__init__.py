"""Trainer pieces: optimizer, evaluator of routing statistics, atomic checkpoints,
whole-line metrics, step seeds, routing statistics after backward, a checked predictor,
dge's log set-up."""
from .checkpoint import AtomicCheckpointer, load_weights, remove_unfinished_writes
from .evaluator import DGEStatsEvaluator, build_evaluator
from .metrics import WholeLinesJSONWriter
from .optimizer import build_lr_scheduler, build_optimizer, no_weight_decay_params, param_groups
from .routing_stats import RoutingStatsWriter
from .seeds import StepSeeds
from .predictor import Predictor, as_predictor_image, tool_predictor
from .logs import run_tool, setup_dge_logger
