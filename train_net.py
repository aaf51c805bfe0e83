#!/usr/bin/env python
"""Train and evaluate DGE models (Mask R-CNN, Semantic FPN) with detectron2.

    python train_net.py --config-file configs/mask_rcnn_pvt_s_dge_1x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model.pth
    python train_net.py --config-file ... --resume           # continue the last checkpoint
    python train_net.py --config-file ... --register-coco my_train train.json images/ DATASETS.TRAIN '("my_train",)'

``--num-gpus N`` starts N processes: one per GPU with NCCL where CUDA is available,
otherwise N CPU processes joined by gloo. Scaling: SOLVER.IMS_PER_BATCH is the total over
all processes; with SOLVER.REFERENCE_WORLD_SIZE set, detectron2 scales the batch, the
learning rate (linearly) and the schedule (inversely) to the actual world size.
"""
import logging
import os
import weakref

import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter

import dge  # noqa: F401  (registers backbones, meta-architectures and datasets)
from dge.config import load_config
from dge.files import take_run_lock
from dge.detectron2.compat import cpu_ddp_support, launch, restart_data_iterator
from dge.detectron2.data import CheckedDatasetMapper, check_datasets, register_coco_dataset
from dge.detectron2.data.loader import build_resumable_train_loader, build_test_loader, validated_test_records
from dge.detectron2.data.augmentation import build_sem_seg_train_augmentation
from dge.detectron2.engine import (
    AtomicCheckpointer,
    RoutingStatsWriter,
    StepSeeds,
    WholeLinesJSONWriter,
    build_evaluator,
    build_lr_scheduler,
    build_optimizer,
    remove_unfinished_writes,
    setup_dge_logger,
)

logger = logging.getLogger("dge")


class Trainer(DefaultTrainer):
    """DefaultTrainer with DGE's optimizer, evaluators, data checks and atomic checkpoints."""

    def __init__(self, cfg):
        with cpu_ddp_support():
            super().__init__(cfg)

    @property
    def data_seed(self) -> int:
        """The seed of the training stream (and of every step's random draws)."""
        return self._trainer.data_loader.batches.seed

    def build_hooks(self):
        # Replaces DefaultTrainer's checkpointer before its hooks capture it.
        self.checkpointer = AtomicCheckpointer(
            self._trainer.model,
            self.cfg.OUTPUT_DIR,
            allow_partial=self.cfg.MODEL.ALLOW_PARTIAL_WEIGHTS,
            trainer=weakref.proxy(self),
        )
        return [StepSeeds(), RoutingStatsWriter()] + super().build_hooks()

    def build_writers(self):
        # metrics.json through a writer that never leaves a half-written line (disk full).
        writers = super().build_writers()
        for i, writer in enumerate(writers):
            if isinstance(writer, JSONWriter):
                writer.close()
                writers[i] = WholeLinesJSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))
        return writers

    # detectron2 v0.6's DefaultTrainer checkpoints no optimizer state (later versions do):
    # save and restore it, and the data seed (the data position and every random draw
    # follow from it and the iteration), so that --resume continues exactly.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        ret["data_seed"] = self.data_seed
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        if "data_seed" in state_dict:
            self._trainer.data_loader.batches.seed = state_dict["data_seed"]

    def resume_or_load(self, resume=True):
        if comm.is_main_process():
            for path in remove_unfinished_writes(self.cfg.OUTPUT_DIR):
                logger.warning(f"removed {path}: a checkpoint write that did not finish (the process was stopped)")
        super().resume_or_load(resume=resume)
        self._write_missing_final()
        # The stream continues at the batch of the first iteration to run; the trainer's
        # iterator has not started its workers yet (ResumableLoader is lazy).
        loader = self._trainer.data_loader
        loader.batches.start = self.start_iter  # one batch per iteration
        restart_data_iterator(self._trainer)

    def train(self):
        if comm.is_main_process():
            self._warn_about_the_budget()
        try:
            return super().train()
        except FloatingPointError:  # detectron2's "Loss became infinite or NaN"
            last = self.checkpointer.get_checkpoint_file() if self.checkpointer.has_checkpoint() else "none"
            logger.error(f"training diverged at iteration {self.iter}; the last finite checkpoint is {last} "
                         "(resume from it with a lower SOLVER.BASE_LR, or a longer SOLVER.WARMUP_ITERS)")
            raise

    def _warn_about_the_budget(self) -> None:
        """Says at the start when the budget loss cannot reach MODEL.DGE.BUDGET (training inputs
        of the largest MIN_SIZE_TRAIN at 4:3, within MAX_SIZE_TRAIN)."""
        model = self.model.module if hasattr(self.model, "module") else self.model  # DDP
        if not hasattr(model, "budget_warnings"):
            return
        h = max(self.cfg.INPUT.MIN_SIZE_TRAIN)
        for message in model.budget_warnings((h, min(self.cfg.INPUT.MAX_SIZE_TRAIN, round(h * 4 / 3)))):
            logger.warning(message)

    def _write_missing_final(self) -> None:
        """A run stopped while it wrote model_final.pth resumes at MAX_ITER: nothing is left to
        train, and the final weights are those just loaded (the last iteration's): written now."""
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if self.start_iter >= self.max_iter and not os.path.exists(final) and comm.is_main_process():
            logger.warning(f"the run had ended but {final} is missing (stopped while it was written): writing it now")
            self.checkpointer.save("model_final", iteration=self.start_iter - 1)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_train_loader(cls, cfg):
        kinds = {name: MetadataCatalog.get(name).get("evaluator_type") for name in cfg.DATASETS.TRAIN}
        if "sem_seg" not in kinds.values():
            return build_resumable_train_loader(cfg, CheckedDatasetMapper(cfg, is_train=True))
        if set(kinds.values()) != {"sem_seg"}:
            raise ValueError(f"DATASETS.TRAIN mixes semantic segmentation with other tasks: {kinds}")
        augmentations = build_sem_seg_train_augmentation(cfg)
        return build_resumable_train_loader(cfg, CheckedDatasetMapper(cfg, is_train=True, augmentations=augmentations))


def argument_parser():
    """detectron2's ``default_argument_parser`` and ``--register-coco NAME JSON IMAGES``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--register-coco", nargs=3, action="append", default=[], metavar=("NAME", "JSON", "IMAGES"),
        help="register a COCO-format dataset (instances json, image folder) as NAME for DATASETS.TRAIN / TEST; "
        "repeat for each split",
    )
    return parser


def setup(args):
    for name, json_file, image_root in getattr(args, "register_coco", None) or []:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    if comm.is_main_process():  # one run per OUTPUT_DIR: before it writes config.yaml and log.txt
        take_run_lock(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    setup_dge_logger(cfg.OUTPUT_DIR)  # dge's lines in the console and OUTPUT_DIR/log.txt, as detectron2's
    if cfg.MODEL.DEVICE == "cpu":
        logger.info("CUDA is not available: running on the CPU")
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.SOLVER.TF32
        logger.info(f"TF32 in float32 matmuls and convolutions: {cfg.SOLVER.TF32}; AMP: {cfg.SOLVER.AMP.ENABLED}")
    return cfg


def main(args):
    cfg = setup(args)
    check_datasets(cfg.DATASETS.TEST if args.eval_only else cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR, allow_partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    for name in cfg.DATASETS.TEST:  # a broken evaluation set stops the run now, not after training
        validated_test_records(cfg, name)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
