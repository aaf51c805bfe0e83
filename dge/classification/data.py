"""ImageNet-style folders for classification: checks with clear messages, timm transforms,
and the (distributed) loaders.

Layout: ``ROOT/train/<class>/<image>`` and ``ROOT/val/<class>/<image>`` (the ImageNet layout
of DeiT / PVT / vtpack); class indices follow the sorted class-folder names of ``train``.
"""
import os
from typing import List, Sequence, Tuple

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

__all__ = [
    "UnreadableImageError",
    "build_dataset",
    "build_loader",
    "build_transforms",
    "check_image_folder",
    "load_rgb",
]


class UnreadableImageError(RuntimeError):
    """An image file of the dataset cannot be decoded."""


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB; raises UnreadableImageError naming the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # what PIL raises for corrupt or truncated files
        raise UnreadableImageError(
            f"could not read image {path!r} ({type(e).__name__}: {e}). The file is corrupt or not an "
            "image: replace it or remove it from the dataset, then rerun (--resume continues from the "
            "last checkpoint)."
        ) from e


def check_image_folder(root: str, split: str) -> str:
    """``root/split`` if it is a folder of class folders; raises FileNotFoundError otherwise."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"--data-path {root!r} is not a folder. It must hold train/ and val/, each with one "
            "sub-folder of images per class (the ImageNet layout)"
        )
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise FileNotFoundError(
            f"{path!r} does not exist: --data-path must hold train/ and val/ folders with one sub-folder "
            f"of images per class; {root!r} has the folders {present}"
        )
    if not any(e.is_dir() for e in os.scandir(path)):
        raise FileNotFoundError(f"{path!r} has no class folders: put each class's images in {path}/<class>/")
    return path


def build_dataset(root: str, split: str, transform, classes: Sequence[str] = ()) -> ImageFolder:
    """The ImageFolder of ``root/split`` read with ``load_rgb``.

    Args:
        classes: the training set's class names; a split with other class folders is refused
            (its label indices would not match).
    Raises:
        FileNotFoundError: a missing folder, a split without images or with empty class folders.
        ValueError: class folders that differ from ``classes``.
    """
    path = check_image_folder(root, split)
    dataset = ImageFolder(path, transform=transform, loader=load_rgb, allow_empty=True)
    if not dataset.samples:
        raise FileNotFoundError(
            f"no images in {path!r}: its class folders {dataset.classes[:5]} hold no file with an image "
            f"extension {IMG_EXTENSIONS}"
        )
    counts = torch.bincount(torch.tensor(dataset.targets), minlength=len(dataset.classes))
    empty = [c for c, n in zip(dataset.classes, counts.tolist()) if n == 0]
    if empty:
        raise FileNotFoundError(
            f"class folders without images in {path!r}: {empty[:10]}; remove them or add images "
            f"(extensions {IMG_EXTENSIONS})"
        )
    if classes and list(classes) != dataset.classes:
        missing = sorted(set(classes) - set(dataset.classes))
        extra = sorted(set(dataset.classes) - set(classes))
        raise ValueError(
            f"the class folders of {path!r} differ from the training classes: missing {missing[:10]}, "
            f"not in training {extra[:10]}"
        )
    return dataset


def build_transforms(data_config: dict, aa: str, reprob: float) -> Tuple:
    """(train, eval) transforms of the DeiT / PVT recipe: random-resized crop, flip, timm's
    auto-augment policy ``aa`` ("" or "none": off), random erasing ``reprob``; eval resizes to
    input / crop_pct and center-crops."""
    common = dict(
        input_size=data_config["input_size"],
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
    )
    policy = None if aa in ("", "none") else aa
    train = create_transform(is_training=True, auto_augment=policy, re_prob=reprob, re_mode="pixel", **common)
    val = create_transform(is_training=False, crop_pct=data_config["crop_pct"], **common)
    return train, val


def build_loader(
    dataset, batch_size: int, train: bool, workers: int, rank: int, world_size: int, seed: int
) -> DataLoader:
    """Training: every process draws ``batch_size`` images of a DistributedSampler shuffle
    (seeded by ``seed`` and the epoch: ``loader.sampler.set_epoch``), incomplete batches dropped.
    Evaluation: process r takes images r, r + world_size, ... in order, none repeated, so the
    summed metrics are exact.

    Workers are started anew each epoch: their seeds come from the global torch RNG, which
    checkpoints restore, so a resumed run draws the same augmentations as an uninterrupted one."""
    pin = torch.cuda.is_available()
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=True)
    shard: List[int] = list(range(rank, len(dataset), world_size))
    return DataLoader(Subset(dataset, shard), batch_size, shuffle=False, num_workers=workers, pin_memory=pin)
