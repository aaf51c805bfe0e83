"""
The built-in synthetic dataset: coloured shapes on partly flat, partly textured backgrounds.

It gives a content-adaptive backbone something to learn (large flat areas where coarse
queries suffice, textured areas and object edges where they do not) while being small
enough to train a Mask R-CNN on a CPU in minutes. The same data serve instance
segmentation (COCO json with polygon masks) and semantic segmentation (label maps).

Layout under ``root`` (by default ``$DETECTRON2_DATASETS/dge_synthetic``)::

    VERSION                          hash of the generator's source and parameters
    SHA1SUMS                         checksums of every file below (``sha1sum -c`` format)
    annotations/instances_<split>.json
    <split>/<index:06d>.png          RGB images
    sem_seg/<split>/<index:06d>.png  uint8 labels: 0 = background, k = category id k

The data are generated on first use (not at import), atomically, so that several processes
(DDP ranks) may ask for them at once.
"""
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple


from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg

from . import shapes
from .shapes import DEFAULT_IMAGE_SIZE, DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, SPLITS, SYNTHETIC_CLASSES, generate_synthetic_coco

__all__ = [
    "SYNTHETIC_CLASSES",
    "generate_synthetic_coco",
    "ensure_synthetic_dataset",
    "register_synthetic_datasets",
]

logger = logging.getLogger(__name__)

def _default_root() -> str:
    datasets = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
    return os.path.join(datasets, "dge_synthetic")


def _version_tag(params: Dict[str, Any]) -> str:
    """Hash of the generator's source (this file and ``shapes.py``) and the generation
    parameters: any change regenerates."""
    source = b""
    for path in (__file__, shapes.__file__):
        with open(path, "rb") as f:
            source += f.read()
    return hashlib.sha1(source + json.dumps(params, sort_keys=True).encode()).hexdigest()


def _read_version(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, "VERSION")) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _sha1(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def _write_checksums(root: str) -> None:
    paths = sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _, names in os.walk(root)
        for name in names
    )
    with open(os.path.join(root, "SHA1SUMS"), "w") as f:
        f.writelines(f"{_sha1(os.path.join(root, p))}  {p}\n" for p in paths)


def _verify_split(root: str, split: str) -> None:
    """Raise a RuntimeError naming the first missing or altered file of `split`."""
    hint = f"Delete {root} to have the synthetic dataset regenerated."
    try:
        with open(os.path.join(root, "SHA1SUMS")) as f:
            entries = [line.rstrip("\n").split("  ", 1) for line in f]
    except FileNotFoundError:
        raise RuntimeError(f"{os.path.join(root, 'SHA1SUMS')} is missing. {hint}") from None
    prefixes = (f"{split}/", f"sem_seg/{split}/", f"annotations/instances_{split}.json")
    for checksum, relpath in entries:
        if not relpath.startswith(prefixes):
            continue
        path = os.path.join(root, relpath)
        if not os.path.isfile(path):
            raise RuntimeError(f"Synthetic dataset file {path} is missing. {hint}")
        if _sha1(path) != checksum:
            raise RuntimeError(f"Synthetic dataset file {path} is corrupt (SHA-1 mismatch). {hint}")


def _publish(tmp: str, root: str, version: str) -> None:
    """Move the finished dataset `tmp` to `root`, unless another process's copy got there first."""
    while True:
        try:
            os.rename(tmp, root)  # atomic; replaces `root` only if it is an empty directory
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _read_version(root) == version:
            shutil.rmtree(tmp)
            return
        stale = f"{root}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(root, stale)
        except FileNotFoundError:
            continue  # another process moved it away first
        shutil.rmtree(stale)


def ensure_synthetic_dataset(
    root: Optional[str] = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> str:
    """
    Make sure `root` holds both splits generated with these parameters by this generator,
    generating them if it does not. Safe to call from several processes at once: each
    generates into a temporary sibling folder and renames it into place.

    Args:
        root: defaults to ``$DETECTRON2_DATASETS/dge_synthetic`` (``datasets/dge_synthetic``).
        image_size: (height, width) in pixels.
    Returns:
        root.
    """
    root = _default_root() if root is None else root
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": list(image_size),
        "seed": seed,
    }
    version = _version_tag(params)
    found = _read_version(root)
    if found == version:
        return root
    if found is None and os.path.isdir(root) and os.listdir(root):
        raise RuntimeError(
            f"{root} exists but holds no dge synthetic dataset (no VERSION file); "
            "move it away or point DETECTRON2_DATASETS elsewhere."
        )
    logger.info(
        f"Generating synthetic dataset ({num_train} train + {num_val} val images of "
        f"{image_size[0]}x{image_size[1]}, seed {seed}) into {root} ..."
    )
    start = time.perf_counter()
    tmp = f"{root}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    generate_synthetic_coco(tmp, "train", num_train, seed, image_size)
    generate_synthetic_coco(tmp, "val", num_val, seed, image_size)
    _write_checksums(tmp)
    with open(os.path.join(tmp, "VERSION"), "w") as f:
        f.write(version + "\n")
    _publish(tmp, root, version)
    logger.info(f"Generated synthetic dataset in {root} in {time.perf_counter() - start:.1f} s.")
    return root


def _load_instances(root: str, split: str, params: Dict[str, Any]) -> List[Dict[str, Any]]:
    ensure_synthetic_dataset(root, **params)
    _verify_split(root, split)
    json_file = os.path.join(root, "annotations", f"instances_{split}.json")
    return load_coco_json(json_file, os.path.join(root, split), f"dge_synthetic_{split}")


def _load_sem_seg(root: str, split: str, params: Dict[str, Any]) -> List[Dict[str, Any]]:
    ensure_synthetic_dataset(root, **params)
    _verify_split(root, split)
    return load_sem_seg(
        os.path.join(root, "sem_seg", split),
        os.path.join(root, split),
        gt_ext="png",
        image_ext="png",
    )


def _register(
    name: str, loader: Callable[[], List[Dict[str, Any]]], metadata: Dict[str, Any]
) -> None:
    """Register `name`, replacing an earlier registration of it."""
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_synthetic_datasets(
    root: Optional[str] = None,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
) -> None:
    """
    Register (or re-register) ``dge_synthetic_{train,val}`` (instances, COCO evaluation) and
    ``dge_synthetic_sem_seg_{train,val}`` (semantic segmentation) for data under `root`.
    Nothing is generated here: the data are generated by :func:`ensure_synthetic_dataset`
    the first time a dataset is loaded. Arguments as for :func:`ensure_synthetic_dataset`.
    """
    root = _default_root() if root is None else root
    params = {
        "num_train": num_train,
        "num_val": num_val,
        "image_size": tuple(image_size),
        "seed": seed,
    }
    for split in SPLITS:
        image_root = os.path.join(root, split)
        _register(
            f"dge_synthetic_{split}",
            functools.partial(_load_instances, root, split, params),
            {
                "json_file": os.path.join(root, "annotations", f"instances_{split}.json"),
                "image_root": image_root,
                "evaluator_type": "coco",
                "generator": __name__,
                "thing_classes": list(SYNTHETIC_CLASSES),
                "thing_dataset_id_to_contiguous_id": {
                    k + 1: k for k in range(len(SYNTHETIC_CLASSES))
                },
            },
        )
        _register(
            f"dge_synthetic_sem_seg_{split}",
            functools.partial(_load_sem_seg, root, split, params),
            {
                "image_root": image_root,
                "sem_seg_root": os.path.join(root, "sem_seg", split),
                "evaluator_type": "sem_seg",
                "generator": __name__,
                "stuff_classes": ["background", *SYNTHETIC_CLASSES],
                "ignore_label": 255,
            },
        )


register_synthetic_datasets()
