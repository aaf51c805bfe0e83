"""A training data stream that a resumed run continues exactly.

detectron2's training loader restarts its shuffle on ``--resume`` (the resumed run reads
iteration 0's images again), and its augmentation draws depend on which worker maps an
image. Here everything is a function of (seed, rank, position):

* ``ResumableBatches``: this rank's infinite stream of batches of (position, index), an
  infinite reshuffle seeded by ``seed``, every ``world_size``-th index for this rank,
  grouped by aspect (width > height) like detectron2's ``AspectRatioGroupedDataset``, but
  on the records' sizes: the stream after any number of batches is known without reading
  an image, so a resumed run skips the batches the interrupted one trained on;
* each record is mapped (read, augmented) with numpy / random / torch seeded from
  (seed, rank, position), whichever worker maps it;
* ``step_seed``: the main process's RNGs (Gumbel noise, dropout, drop path) are re-seeded
  from (seed, rank, iteration) before each step (``dge.detectron2.engine.StepSeeds``).

The checkpoint thus needs the seed and the iteration only; every rank recomputes its own
position. Worker count may differ between the runs.
"""
import itertools
import json
import logging
import random
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.data.build import worker_init_reset_seed
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from .checks import CheckedDatasetMapper
from .validation import validate_records

__all__ = [
    "ResumableBatches",
    "ResumableLoader",
    "build_resumable_train_loader",
    "build_test_loader",
    "check_num_classes",
    "step_seed",
    "validated_test_records",
]

logger = logging.getLogger(__name__)


def step_seed(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A 31-bit seed for (seed, rank, step) in one of several streams (0: training steps,
    1: mapping records)."""
    mixed = np.random.SeedSequence([seed, rank, step, stream]).generate_state(1)[0]
    return int(mixed) & 0x7FFFFFFF


class ResumableBatches(Sampler):
    """This rank's batches, from batch ``start`` on: lists of (position in the rank's
    index stream, dataset index).

    Args:
        groups: [N] aspect group of each record (0: wider than tall, 1: otherwise); one
            value for all records turns grouping off.
        batch_size: images per batch on this rank.
        seed: shuffle seed, the same on every rank.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(groups) == 0:
            raise ValueError("the training set is empty")
        if batch_size < 1:
            raise ValueError(f"batch size per process must be >= 1; got {batch_size}")
        self.groups = list(groups)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def _indices(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(len(self.groups), generator=gen).tolist()

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        stream = itertools.islice(self._indices(), self.rank, None, self.world_size)
        buckets = {}
        emitted = 0
        for position, index in enumerate(stream):
            bucket = buckets.setdefault(self.groups[index], [])
            bucket.append((position, index))
            if len(bucket) == self.batch_size:
                if emitted >= self.start:
                    yield list(bucket)
                emitted += 1
                bucket.clear()


class _MappedBatches(IterableDataset):
    """Batches of mapped records; worker w of W maps batches w, w + W, ... (the loader
    returns them in the sampler's order)."""

    def __init__(self, records: DatasetFromList, mapper: Callable, batches: ResumableBatches):
        self.records = records
        self.mapper = mapper
        self.batches = batches

    def _map(self, position: int, index: int):
        states = (np.random.get_state(), random.getstate(), torch.get_rng_state())
        seed = step_seed(self.batches.seed, self.batches.rank, position, stream=1)
        np.random.seed(seed)
        random.seed(seed)
        # The CPU generator only (saved and restored): mapping in the main process (no workers)
        # leaves the step's CUDA draws as they are, as mapping in a worker does.
        torch.default_generator.manual_seed(seed)
        try:
            out = self.mapper(self.records[index])
        finally:
            np.random.set_state(states[0])
            random.setstate(states[1])
            torch.set_rng_state(states[2])
        if out is None:
            raise RuntimeError(f"the dataset mapper returned None for record {index}")
        return out

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, batch in enumerate(self.batches):
            if i % workers == worker:
                yield [self._map(position, index) for position, index in batch]


def _identity(batch):
    return batch


class ResumableLoader:
    """The training loader: ``iter()`` gives batches from ``batches.start`` on, of the stream
    of ``batches.seed``; the data loader (and its workers) start at the first ``next``, so
    that a resume can still set both after the trainer took its iterator."""

    def __init__(self, dataset: _MappedBatches, num_workers: int):
        self.dataset = dataset
        self.batches = dataset.batches
        self.num_workers = num_workers

    def __iter__(self):
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=worker_init_reset_seed,
            # Its base seed from its own generator: starting it draws nothing from the global
            # RNG (a resumed run starts it at another step than the uninterrupted one).
            generator=torch.Generator().manual_seed(self.batches.seed),
        )
        return _LazyIterator(loader)


class _LazyIterator:
    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self.iterator is None:
            self.iterator = iter(self.loader)
        return next(self.iterator)


def dataset_records(names: Sequence[str], **kwargs) -> List[dict]:
    """detectron2's ``get_detection_dataset_dicts(names, **kwargs)``; an annotation file that
    is not valid JSON is named in the error (pycocotools' JSONDecodeError does not)."""
    try:
        return get_detection_dataset_dicts(list(names), **kwargs)
    except json.JSONDecodeError as e:
        files = [f for f in (MetadataCatalog.get(n).get("json_file") for n in names) if f]
        raise ValueError(f"the annotation file {' or '.join(files) or '?'} of dataset {', '.join(names)} is not valid JSON: {e}") from e


def check_num_classes(cfg, names: Sequence[str]) -> None:
    """A detector whose MODEL.ROI_HEADS.NUM_CLASSES differs from its loaded datasets' class
    count stops here, naming both (else a box head fails later on an index out of bounds)."""
    if "RCNN" not in cfg.MODEL.META_ARCHITECTURE:
        return
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
            raise ValueError(
                f"dataset {name!r} has {len(classes)} classes ({', '.join(classes[:5])}"
                f"{', ...' if len(classes) > 5 else ''}); MODEL.ROI_HEADS.NUM_CLASSES is "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}: set it to {len(classes)}"
            )


def build_resumable_train_loader(cfg, mapper: Callable, seed: Optional[int] = None) -> ResumableLoader:
    """detectron2's training set of ``cfg.DATASETS.TRAIN`` (same filtering), validated
    (``dge.detectron2.data.validation``), as a ``ResumableLoader``; ``seed`` None: ``cfg.SEED`` if >= 0,
    else one drawn and shared by all ranks (the trainer keeps it in its checkpoints)."""
    records = dataset_records(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )
    check_num_classes(cfg, cfg.DATASETS.TRAIN)
    records, _ = validate_records(
        records, ",".join(cfg.DATASETS.TRAIN), cfg.DATALOADER.CHECK_IMAGES, cfg.DATALOADER.BOX_OUTSIDE_IMAGE
    )
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS:
        records = [r for r in records if "annotations" not in r or r["annotations"]]
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by {world} processes")
    sized = all("width" in r and "height" in r for r in records)
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING and sized:
        groups = [0 if r["width"] > r["height"] else 1 for r in records]
    else:  # (records without sizes, e.g. semantic segmentation files: one group)
        groups = [0] * len(records)
    if seed is None:
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    batches = ResumableBatches(groups, cfg.SOLVER.IMS_PER_BATCH // world, seed, comm.get_rank(), world)
    dataset = _MappedBatches(DatasetFromList(records, copy=True), mapper, batches)
    return ResumableLoader(dataset, cfg.DATALOADER.NUM_WORKERS)


def validated_test_records(cfg, dataset_name: str) -> List[dict]:
    """The records of an evaluation dataset, checked (``dge.detectron2.data.validation``; image checks
    are cached, so checking before training and again at evaluation reads nothing twice)."""
    records = dataset_records([dataset_name], filter_empty=False)
    validate_records(records, dataset_name, cfg.DATALOADER.CHECK_IMAGES, cfg.DATALOADER.BOX_OUTSIDE_IMAGE)
    return records


def build_test_loader(cfg, dataset_name: str):
    """detectron2's test loader of ``dataset_name``, validated, with ``CheckedDatasetMapper``
    (images resized as INPUT.*_TEST): what evaluation in training and the tools read."""
    return build_detection_test_loader(
        validated_test_records(cfg, dataset_name),
        mapper=CheckedDatasetMapper(cfg, is_train=False),
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
