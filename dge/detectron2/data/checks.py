"""Clear errors for datasets that are not there and images that cannot be read."""
import os
from typing import Iterable

from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

__all__ = ["check_datasets", "register_coco_dataset", "CheckedDatasetMapper"]

_PATH_KEYS = ("json_file", "image_root", "sem_seg_root", "panoptic_root")


def register_coco_dataset(name: str, json_file: str, image_root: str) -> None:
    """Registers a COCO-format instances file and its image folder as ``name`` (detectron2's
    ``register_coco_instances``); again with the same files: nothing to do; ``name`` taken
    by other files, or a path that does not exist: a ValueError / FileNotFoundError."""
    for what, path in (("annotation file", json_file), ("image folder", image_root)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"dataset {name!r}: the {what} {path!r} does not exist")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if (meta.get("json_file"), meta.get("image_root")) == (json_file, image_root):
            return
        raise ValueError(f"dataset {name!r} is already registered (with {meta.get('json_file')!r}); choose another name")
    register_coco_instances(name, {}, json_file, image_root)


def check_datasets(names: Iterable[str]) -> None:
    """Raise a clear error for an unregistered dataset or a missing folder/file of a
    registered one (COCO, ADE20K, ...); datasets that dge generates are generated here."""
    for name in names:
        if name not in DatasetCatalog.list():
            known = ", ".join(sorted(DatasetCatalog.list()))
            raise KeyError(f"dataset {name!r} is not registered. Registered datasets: {known}")
        meta = MetadataCatalog.get(name)
        if meta.get("generator"):
            DatasetCatalog.get(name)  # generated on first use
            continue
        for key in _PATH_KEYS:
            path = meta.get(key)
            if path and not os.path.exists(path):
                root = os.environ.get("DETECTRON2_DATASETS", "datasets")
                raise FileNotFoundError(
                    f"dataset {name!r} expects its {key} at {path!r}, which does not exist. "
                    f"Datasets are looked up under DETECTRON2_DATASETS (now {root!r}); see "
                    "https://detectron2.readthedocs.io/en/latest/tutorials/builtin_datasets.html "
                    "for the expected layout."
                )


class CheckedDatasetMapper(DatasetMapper):
    """detectron2's DatasetMapper that names the file when an image cannot be read. Unless
    the dataset was fully decoded before the start (``DATALOADER.CHECK_IMAGES full``), each
    image is decoded once more here: detectron2's reader turns a corrupt file into a black
    image without an error."""

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.decode_check = cfg.DATALOADER.CHECK_IMAGES != "full"

    def __call__(self, dataset_dict):
        try:
            if self.decode_check:
                with Image.open(dataset_dict["file_name"]) as im:
                    im.load()
            return super().__call__(dataset_dict)
        except (OSError, SyntaxError) as e:  # what PIL raises for corrupt or truncated files
            name = dataset_dict.get("file_name", "?")
            if not os.path.exists(name):
                raise FileNotFoundError(f"image {name!r} of the dataset does not exist (any more)") from e
            raise RuntimeError(
                f"could not read image {name!r} ({type(e).__name__}: {e}). The file is corrupt or "
                "not an image: replace it or drop it from the dataset."
            ) from e
