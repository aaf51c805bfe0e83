"""Datasets: importing this package registers the synthetic datasets (dge_synthetic_*)."""
from .checks import CheckedDatasetMapper, check_datasets
from .images import DEFAULT_PHOTOS, UnreadableImage, add_image_arguments, iter_images
from .synthetic import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    register_synthetic_datasets,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
