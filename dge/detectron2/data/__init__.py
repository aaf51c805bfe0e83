"""Datasets: importing this package registers the synthetic datasets (dge_synthetic_*)."""
from .checks import CheckedDatasetMapper, check_datasets, register_coco_dataset
from .images import DEFAULT_PHOTOS, UnreadableImage, add_image_arguments, iter_images
from .synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    register_synthetic_datasets,
)

__all__ = [
    "CheckedDatasetMapper",
    "DEFAULT_PHOTOS",
    "SYNTHETIC_CLASSES",
    "UnreadableImage",
    "add_image_arguments",
    "check_datasets",
    "ensure_synthetic_dataset",
    "generate_synthetic_coco",
    "iter_images",
    "register_coco_dataset",
    "register_synthetic_datasets",
]
