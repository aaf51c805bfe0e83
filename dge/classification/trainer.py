"""The classification run: data, model and recipe from the arguments, the epoch loop with
evaluation, atomic checkpoints (``checkpoint.pth`` every epoch, ``best.pth`` at the best top-1),
``metrics.json``, ``config.yaml`` and TensorBoard events (detectron2's writers); ``--resume``
continues exactly where a run stopped."""
import argparse
import os
import random
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import yaml
import torch
import torch.distributed as dist
from timm.data import resolve_data_config
from torch import nn
from detectron2.utils.events import EventStorage, TensorboardXWriter

from ..layers import BudgetLoss, DGEOptions
from ..models.convert import checkpoint_filter_fn
from .build import REFERENCE_BATCH, build_criterion, build_mixup, build_model, build_optimizer, build_scheduler
from ..detectron2.engine.checkpoint import AtomicCheckpointer
from ..files import atomic_write_text
from ..detectron2.engine.metrics import WholeLinesJSONWriter
from .checkpoint import load_checkpoint, rng_state, set_rng_state
from .data import build_dataset, build_loader, build_transforms
from .distributed import DistEnv, init_distributed
from ..analysis.flops import outside_dge_flops
from .engine import evaluate, train_one_epoch, unwrap

__all__ = ["MODEL_ARGS", "RunLog", "format_results", "load_weights", "run"]

# Arguments that define the network: a checkpoint only fits a run with the same values.
MODEL_ARGS = ("model", "no_dge", "granularities", "region_size", "routing", "estimator", "input_size")


def _dge_options(args: argparse.Namespace) -> Optional[DGEOptions]:
    if not args.model.endswith("_dge") or args.no_dge:
        return None
    return DGEOptions(
        granularities=tuple(args.granularities),
        region_size=args.region_size,
        routing=args.routing,
        estimator=args.estimator,
    )


def _resume_path(args: argparse.Namespace) -> Optional[str]:
    """The checkpoint to continue from: --resume PATH, or DIR/checkpoint.pth for a bare --resume
    (None when that does not exist yet: a fresh start)."""
    if args.resume is None:
        return None
    if args.resume:
        return args.resume
    path = os.path.join(args.output_dir, "checkpoint.pth")
    return path if os.path.isfile(path) else None


def _check_same_model(checkpoint: Dict, args: argparse.Namespace, path: str) -> None:
    saved = checkpoint.get("args", {})
    diffs = [
        f"--{k.replace('_', '-')} {saved.get(k)!r} (this run: {getattr(args, k)!r})"
        for k in MODEL_ARGS
        if k in saved and saved[k] != getattr(args, k)
    ]
    if diffs:
        raise ValueError(f"checkpoint {path!r} holds another network: it was trained with " + "; ".join(diffs))


def load_weights(model: nn.Module, path: str) -> List[str]:
    """Loads ``path`` (this tool's checkpoint, or an official PVT v1 / vtpack / timm DeiT one,
    converted by the model family's ``checkpoint_filter_fn``) into ``model``; returns the model
    keys the file did not provide."""
    state = load_checkpoint(path)
    missing, _ = model.load_state_dict(checkpoint_filter_fn(state, model), strict=False)
    return missing


def format_results(results: Dict[str, float]) -> str:
    """One line: top-1, top-5, loss, GFLOPs per image, β (total, per stage) and φ shares."""
    line = (
        f"top-1 {results['acc1']:.2f}  top-5 {results['acc5']:.2f}  loss {results['loss']:.4f}  "
        f"GFLOPs/image {results['gflops']:.3f} (vanilla {results['static_gflops']:.3f})"
    )
    if "beta" in results:
        stages = " ".join(f"{v:.3f}" for k, v in results.items() if k.startswith("beta_stage"))
        shares = " ".join(
            f"φ={k[len('share_phi'):]}: {v:.2f}" for k, v in results.items() if k.startswith("share_phi")
        )
        line += f"  β {results['beta']:.3f} (per stage {stages})  regions {shares}"
    return line + f"  [{int(results['images'])} images]"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _gather_rng(env: DistEnv) -> List[Dict]:
    """Every process's random state, in rank order."""
    state = rng_state()
    if env.world_size == 1:
        return [state]
    states: List[Optional[Dict]] = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


class RunLog:
    """What the main process writes besides checkpoints, with detectron2's event storage and
    writers, as ``train_net.py`` does: ``metrics.json`` (training scalars every ``period``
    steps: ``total_loss``, ``loss_cls``, ``loss_budget``, ``lr``, ``dge/beta`` ...; one row
    per epoch with ``classification/acc1`` ..., ``routing/beta`` ..., ``train/*`` epoch means
    and ``epoch``), TensorBoard events of the same scalars, and ``config.yaml`` (the model,
    its DGE budget and every argument) in ``output_dir``. Other processes write nothing."""

    def __init__(self, output_dir: str, is_main: bool, args: argparse.Namespace, start_step: int, period: int):
        self.storage = EventStorage(start_step).__enter__()  # the current storage, as in detectron2's trainer
        self.period = period
        self.writers = []
        if is_main:
            self.writers = [
                WholeLinesJSONWriter(os.path.join(output_dir, "metrics.json")),
                TensorboardXWriter(output_dir),
            ]
            uses_dge = args.model.endswith("_dge") and not args.no_dge
            config = {
                "MODEL": {"NAME": args.model, "DGE": {"ENABLED": uses_dge, "BUDGET": args.budget}},
                "CLASSIFIER": vars(args),
            }
            atomic_write_text(yaml.safe_dump(config, sort_keys=False), os.path.join(output_dir, "config.yaml"))

    def train_step(self, step: int, scalars: Dict[str, float], last_of_epoch: bool) -> None:
        self.storage.iter = step
        renamed = {"total_loss" if k == "loss" else (k if k.startswith(("loss", "lr")) else f"dge/{k}"): v
                   for k, v in scalars.items()}
        self.storage.put_scalars(**renamed)
        if step % self.period == 0 and not last_of_epoch:  # the epoch's last step is written with its evaluation
            self._write()

    def epoch(self, row: Dict[str, float], train: Dict[str, float], val: Dict[str, float]) -> None:
        scalars = dict(row, **{f"train/{k}": v for k, v in train.items()})
        for k, v in val.items():
            if k == "epoch" or v is None:
                continue
            routing = k.startswith(("beta", "share_phi"))
            scalars[f"routing/{k}" if routing else f"classification/{k}"] = v
        self.storage.put_scalars(**scalars, smoothing_hint=False)
        self._write()

    def _write(self) -> None:
        for writer in self.writers:
            writer.write()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.storage.__exit__(None, None, None)


def _datasets(args: argparse.Namespace, checkpoint: Optional[Dict], resume: Optional[str]):
    """(classes, train set or None for --eval-only, val set), without transforms yet."""
    if args.eval_only:
        val_set = build_dataset(args.data_path, "val", None, checkpoint["classes"] if checkpoint is not None else ())
        return val_set.classes, None, val_set
    train_set = build_dataset(args.data_path, "train", None)
    classes = train_set.classes
    if checkpoint is not None and checkpoint["classes"] != classes:
        raise ValueError(
            f"checkpoint {resume!r} was trained on {len(checkpoint['classes'])} other classes than the "
            f"{len(classes)} class folders of {args.data_path!r}"
        )
    return classes, train_set, build_dataset(args.data_path, "val", None, classes)


@dataclass
class _Progress:
    """Where training continues: the first epoch to run, the optimizer steps taken, the best top-1."""

    epoch: int = 0
    step: int = 0
    best_acc1: float = 0.0


def _batch_per_process(args: argparse.Namespace, env: DistEnv) -> int:
    if args.batch_size % env.world_size:
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {env.world_size} processes")
    batch = args.batch_size // env.world_size
    if _mixup_on(args) and batch % 2:
        raise ValueError(f"mixup / cutmix need an even batch per process; got {batch} (--batch-size {args.batch_size})")
    return batch


def _mixup_on(args: argparse.Namespace) -> bool:
    return not args.eval_only and (args.mixup > 0 or args.cutmix > 0)


def _checkpoint(args: argparse.Namespace, say: Callable[[str], None]) -> Tuple[Optional[str], Optional[Dict]]:
    """(path, contents) of the checkpoint to continue from, checked against the arguments; (None, None)."""
    resume = _resume_path(args)
    checkpoint = load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        _check_same_model(checkpoint, args, resume)
    elif args.resume == "":
        if args.eval_only and not args.weights:
            raise FileNotFoundError(f"--eval-only --resume: there is no checkpoint.pth in {args.output_dir!r}")
        say(f"--resume: no checkpoint in {args.output_dir!r} yet; starting from scratch")
    return resume, checkpoint


def _model(args: argparse.Namespace, classes: List[str], checkpoint: Optional[Dict], device) -> nn.Module:
    """The network with --weights, then the checkpoint's state, on ``device``."""
    model = build_model(args.model, len(classes), args.input_size, args.drop_path, _dge_options(args))
    if args.weights:
        missing = load_weights(model, args.weights)
        if args.eval_only and missing:
            raise ValueError(
                f"--weights {args.weights!r} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}"
            )
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    return model.to(device)


def _train_loader(args: argparse.Namespace, train_set, batch: int, env: DistEnv):
    loader = build_loader(train_set, batch, True, args.workers, env.rank, env.world_size, args.seed)
    if len(loader) == 0:
        raise ValueError(
            f"train/ has {len(train_set)} images, fewer than one batch of {args.batch_size} "
            f"({batch} per process); lower --batch-size"
        )
    return loader


def _recipe(args: argparse.Namespace, model: nn.Module, steps_per_epoch: int, num_classes: int):
    """(optimizer, scheduler, mixup or None, criterion, lr) of the paper's recipe."""
    lr = args.lr * args.batch_size / REFERENCE_BATCH
    optimizer = build_optimizer(model, lr, args.weight_decay)
    scheduler = build_scheduler(
        optimizer, args.epochs, steps_per_epoch, args.warmup_epochs, args.warmup_lr, args.min_lr
    )
    mixup = build_mixup(args.mixup, args.cutmix, args.smoothing, num_classes) if _mixup_on(args) else None
    return optimizer, scheduler, mixup, build_criterion(mixup, args.smoothing), lr


def _resume_state(checkpoint: Optional[Dict], optimizer, scheduler, env: DistEnv, say) -> _Progress:
    """Optimizer, scheduler and random states from ``checkpoint``; where training continues."""
    if checkpoint is None:
        return _Progress()
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    progress = _Progress(checkpoint["epoch"] + 1, checkpoint["step"], checkpoint["best_acc1"])
    states = checkpoint["rng"]
    if len(states) == env.world_size:
        set_rng_state(states[env.rank])
    else:
        say(f"the checkpoint comes from {len(states)} processes, this run has {env.world_size}: "
            "the data order and augmentations will differ from an uninterrupted run")
    return progress


def _distributed(model: nn.Module, args: argparse.Namespace, env: DistEnv) -> nn.Module:
    if env.world_size == 1:
        return model
    unused = 0 in (args.granularities or ())  # φ = 0 everywhere leaves a block unused
    device_ids = [env.local_rank] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=unused)


def _run(args: argparse.Namespace, env: DistEnv, log: Callable[[str], None]) -> Dict[str, float]:
    say = log if env.is_main else (lambda msg: None)
    _seed_everything(args.seed + env.rank)
    batch = _batch_per_process(args, env)
    resume, checkpoint = _checkpoint(args, say)
    classes, train_set, val_set = _datasets(args, checkpoint, resume)
    if len(val_set) < env.world_size:
        raise ValueError(f"val/ has {len(val_set)} images, fewer than the {env.world_size} processes")
    model = _model(args, classes, checkpoint, env.device)
    data_config = resolve_data_config({"input_size": (3, args.input_size, args.input_size)}, model=model)
    train_tf, val_set.transform = build_transforms(data_config, args.aa, args.reprob)
    val_loader = build_loader(val_set, batch, False, args.workers, env.rank, env.world_size, args.seed)
    num_params = sum(p.numel() for p in model.parameters())
    say(f"{args.model}{' without DGE' if args.no_dge else ''}: {num_params / 1e6:.2f}M parameters, "
        f"{len(classes)} classes, {env.world_size} process(es) on {env.device}")
    flops = outside_dge_flops(model, data_config["input_size"])
    if args.eval_only:
        results = evaluate(model, val_loader, env.device, *flops)
        results["epoch"] = checkpoint["epoch"] if checkpoint is not None else None
        say("val: " + format_results(results))
        return results
    train_set.transform = train_tf
    train_loader = _train_loader(args, train_set, batch, env)
    optimizer, scheduler, mixup, criterion, lr = _recipe(args, model, len(train_loader), len(classes))
    progress = _resume_state(checkpoint, optimizer, scheduler, env, say)
    if checkpoint is not None:
        say(f"resumed {resume!r}: epoch {progress.epoch}, step {progress.step}, best top-1 {progress.best_acc1:.2f}")
    model = _distributed(model, args, env)
    if env.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
    say(f"lr {lr:.3g} ({args.lr:g} × {args.batch_size}/{REFERENCE_BATCH}), {len(train_loader)} steps per epoch, "
        f"epochs {progress.epoch}..{args.epochs - 1}")
    loop = _EpochLoop(args, env, model, optimizer, scheduler, mixup, criterion, classes, say)
    return loop.run(train_loader, val_loader, flops, progress)


class _EpochLoop:
    """Epochs of training, each followed by evaluation, checkpoints and the run's log."""

    def __init__(self, args, env: DistEnv, model, optimizer, scheduler, mixup, criterion, classes, say):
        self.args, self.env, self.model, self.say = args, env, model, say
        self.optimizer, self.scheduler, self.mixup = optimizer, scheduler, mixup
        self.criterion, self.classes = criterion, classes
        self.budget = BudgetLoss(args.budget, args.budget_weight) if args.budget is not None else BudgetLoss()
        self.checkpointer = AtomicCheckpointer(
            unwrap(model), args.output_dir, save_to_disk=env.is_main, optimizer=optimizer, scheduler=scheduler
        )

    def run(self, train_loader, val_loader, flops, progress: _Progress) -> Dict[str, float]:
        args, env = self.args, self.env
        run_log = RunLog(args.output_dir, env.is_main, args, progress.step, args.print_freq)
        results: Dict[str, float] = {}
        try:
            for epoch in range(progress.epoch, args.epochs):
                start = time.perf_counter()
                train_loader.sampler.set_epoch(epoch)
                progress.step, train_stats = train_one_epoch(
                    self.model, train_loader, self.optimizer, self.scheduler, self.criterion, epoch=epoch,
                    step=progress.step, device=env.device, mixup=self.mixup, budget=self.budget,
                    clip_grad=args.clip_grad, print_freq=args.print_freq, log=self.say,
                    on_step=lambda i, scalars: run_log.train_step(i, scalars, i % len(train_loader) == 0),
                )
                results = self._evaluate(val_loader, flops, epoch, progress)
                elapsed = time.perf_counter() - start
                row = dict(epoch=epoch, step=progress.step, time_s=elapsed, best_acc1=progress.best_acc1)
                run_log.epoch(row, train_stats, results)
        finally:
            run_log.close()
        if not results:
            self.say(f"training already finished at epoch {args.epochs - 1}; evaluating")
            results = evaluate(self.model, val_loader, env.device, *flops)
            results["epoch"] = progress.epoch - 1
            self.say("val: " + format_results(results))
        return results

    def _evaluate(self, val_loader, flops, epoch: int, progress: _Progress) -> Dict[str, float]:
        """The epoch's evaluation, then ``checkpoint.pth`` (and ``best.pth`` at a new best top-1)."""
        results = evaluate(self.model, val_loader, self.env.device, *flops)
        results["epoch"] = epoch
        improved = results["acc1"] >= progress.best_acc1
        progress.best_acc1 = max(progress.best_acc1, results["acc1"])
        rngs = _gather_rng(self.env)  # collective: every process takes part
        if self.env.is_main:  # detectron2's checkpointer (model, optimizer, scheduler), written atomically
            extra = dict(epoch=epoch, step=progress.step, best_acc1=progress.best_acc1, args=vars(self.args),
                         classes=self.classes, rng=rngs)
            if improved:
                self.checkpointer.save("best", **extra)
            self.checkpointer.save("checkpoint", **extra)  # last, so that last_checkpoint names it
        self.say(f"epoch {epoch} val: " + format_results(results) + f"  (best top-1 {progress.best_acc1:.2f})")
        return results


def run(args: argparse.Namespace, log: Optional[Callable[[str], None]] = None) -> Dict[str, float]:
    """Trains (or with ``args.eval_only`` evaluates) as the arguments say; returns the last
    evaluation's results (``engine.evaluate``) with its "epoch"."""
    env = init_distributed(args.device)
    try:
        return _run(args, env, log or print)
    finally:
        env.close()
