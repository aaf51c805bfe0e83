import json
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from scipy.ndimage import binary_fill_holes

from detectron2.data import DatasetCatalog, MetadataCatalog
from dge.detectron2.data import (
    SYNTHETIC_CLASSES,
    ensure_synthetic_dataset,
    generate_synthetic_coco,
    register_synthetic_datasets,
)
from dge.detectron2.data.shapes import _mask_to_polygons
from repo import SMALL_DATA

# Small enough for each test to take a second or two on a CPU.
SMALL = {"num_train": 6, "num_val": 6, "image_size": (64, 96)}


def _read(path: str) -> np.ndarray:
    return np.asarray(Image.open(path))


def _pixels(root: str, split: str) -> list:
    """Every image and label map of `split`, in file order."""
    folders = [os.path.join(root, split), os.path.join(root, "sem_seg", split)]
    return [_read(os.path.join(d, f)) for d in folders for f in sorted(os.listdir(d))]


@pytest.fixture
def synthetic_root(tmp_path, monkeypatch, small_data_folder):
    """Point DETECTRON2_DATASETS at tmp_path and register the datasets there, until the end;
    then the session's small ones again (not the full-size default: later tests that use
    ``data_root`` would train and evaluate on it, and generate it on a fresh clone)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_synthetic_datasets(**SMALL)
    yield os.path.join(str(tmp_path), "dge_synthetic")
    monkeypatch.undo()
    register_synthetic_datasets(root=small_data_folder, **SMALL_DATA)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    roots = {name: str(tmp_path / name) for name in ("a", "b", "c")}
    paths = {
        name: generate_synthetic_coco(root, "val", 6, seed, (64, 96))
        for (name, root), seed in zip(roots.items(), (0, 0, 1))
    }
    texts = {name: open(path, "rb").read() for name, path in paths.items()}
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]

    pixels = {name: _pixels(root, "val") for name, root in roots.items()}
    assert len(pixels["a"]) == 12
    assert all(np.array_equal(x, y) for x, y in zip(pixels["a"], pixels["b"]))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels["a"], pixels["c"]))


def test_polygon_masks_boxes_and_areas_agree_with_label_maps(tmp_path):
    root = str(tmp_path)
    coco = COCO(generate_synthetic_coco(root, "val", 6, seed=0, image_size=(64, 96)))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SYNTHETIC_CLASSES
    assert coco.getCatIds() == list(range(1, len(SYNTHETIC_CLASSES) + 1))
    assert len(coco.getAnnIds()) >= 6

    for image in coco.loadImgs(coco.getImgIds()):
        pixels = _read(os.path.join(root, "val", image["file_name"]))
        labels = _read(os.path.join(root, "sem_seg", "val", image["file_name"]))
        assert pixels.shape == (image["height"], image["width"], 3)
        assert labels.shape == (image["height"], image["width"])
        assert set(np.unique(labels)) <= set(range(len(SYNTHETIC_CLASSES) + 1))

        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        assert 1 <= len(annotations) <= 6
        union = {c: np.zeros(labels.shape, dtype=bool) for c in coco.getCatIds()}
        for ann in annotations:
            assert ann["iscrowd"] == 0
            assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])
            mask = coco.annToMask(ann).astype(bool)
            assert (labels[mask] == ann["category_id"]).mean() > 0.95
            assert abs(int(mask.sum()) - ann["area"]) <= 0.05 * ann["area"]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert x <= xs.min() and xs.max() + 1 <= x + w
            assert y <= ys.min() and ys.max() + 1 <= y + h
            assert w <= xs.max() + 2 - xs.min() and h <= ys.max() + 2 - ys.min()
            union[ann["category_id"]] |= mask
        for category_id, mask in union.items():
            truth = labels == category_id
            if truth.any() or mask.any():
                assert (mask & truth).sum() / (mask | truth).sum() > 0.9


def test_polygons_rasterise_back_to_the_exact_mask_holes_included():
    ys, xs = np.mgrid[0:40, 0:60] + 0.5
    d2 = (xs - 20) ** 2 + (ys - 20) ** 2
    mask = (d2 <= 15**2) & (d2 >= 6**2)  # a ring: one component with a hole
    mask[5:9, 24:28] = False  # a second hole, as left by an occluding object
    mask[30:33, 45:55] = True  # a second component
    polygons = _mask_to_polygons(mask)
    assert len(polygons) == 2
    rle = mask_util.merge(mask_util.frPyObjects(polygons, 40, 60))
    assert np.array_equal(mask_util.decode(rle).astype(bool), mask)


def test_ring_annotations_keep_their_holes(tmp_path):
    coco = COCO(generate_synthetic_coco(str(tmp_path), "train", 24, seed=0, image_size=(64, 96)))
    ring = SYNTHETIC_CLASSES.index("ring") + 1
    masks = [coco.annToMask(a).astype(bool) for a in coco.loadAnns(coco.getAnnIds(catIds=[ring]))]
    assert masks
    assert sum((binary_fill_holes(m) & ~m).any() for m in masks) >= len(masks) / 2


def test_objects_hidden_by_later_ones_are_left_out(tmp_path):
    coco = COCO(generate_synthetic_coco(str(tmp_path), "train", 24, seed=0, image_size=(64, 96)))
    assert min(a["area"] for a in coco.loadAnns(coco.getAnnIds())) >= 16


def test_backgrounds_mix_flat_and_textured_areas(tmp_path):
    root = str(tmp_path)
    generate_synthetic_coco(root, "val", 12, seed=0, image_size=(64, 96))
    fractions = []
    for name in sorted(os.listdir(os.path.join(root, "val"))):
        pixels = _read(os.path.join(root, "val", name)).astype(np.float64)
        labels = _read(os.path.join(root, "sem_seg", "val", name))
        blocks = pixels.reshape(8, 8, 12, 8, 3)
        variance = blocks.var(axis=(1, 3)).max(axis=-1)
        background = (labels.reshape(8, 8, 12, 8) == 0).all(axis=(1, 3))
        fractions.append((variance[background] < 1.0).mean())
    assert all(0.1 < f < 0.9 for f in fractions), fractions
    assert 0.2 < np.mean(fractions) < 0.8, fractions


def test_registered_datasets_load_lazily_from_detectron2_datasets(synthetic_root):
    assert not os.path.exists(synthetic_root)  # registering generates nothing
    register_synthetic_datasets(**SMALL)  # registering again is fine

    dicts = DatasetCatalog.get("dge_synthetic_val")
    assert len(dicts) == 6
    assert os.path.isfile(dicts[0]["file_name"])
    assert all(isinstance(a["segmentation"], list) for d in dicts for a in d["annotations"])
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(5))
    meta = MetadataCatalog.get("dge_synthetic_val")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == SYNTHETIC_CLASSES
    assert os.path.isfile(meta.json_file)
    assert os.path.commonpath([meta.image_root, synthetic_root]) == synthetic_root

    sem_seg = DatasetCatalog.get("dge_synthetic_sem_seg_train")
    assert len(sem_seg) == 6
    assert all(os.path.isfile(d["sem_seg_file_name"]) for d in sem_seg)
    meta = MetadataCatalog.get("dge_synthetic_sem_seg_train")
    assert meta.evaluator_type == "sem_seg"
    assert meta.stuff_classes == ["background", *SYNTHETIC_CLASSES]
    assert meta.ignore_label == 255
    assert sorted(os.listdir(os.path.dirname(synthetic_root))) == ["dge_synthetic"]


def test_corrupt_image_names_the_file_and_how_to_regenerate(synthetic_root):
    DatasetCatalog.get("dge_synthetic_val")
    bad = os.path.join(synthetic_root, "val", "000003.png")
    with open(bad, "wb") as f:
        f.write(b"not a png")
    with pytest.raises(RuntimeError, match=r"000003\.png is corrupt.*Delete .*dge_synthetic"):
        DatasetCatalog.get("dge_synthetic_val")
    os.remove(bad)
    with pytest.raises(RuntimeError, match=r"000003\.png is missing"):
        DatasetCatalog.get("dge_synthetic_sem_seg_val")
    DatasetCatalog.get("dge_synthetic_train")  # the other split is intact


def test_changed_parameters_regenerate_instead_of_reusing_stale_data(tmp_path):
    root = str(tmp_path / "dge_synthetic")
    ensure_synthetic_dataset(root, **SMALL)
    version = open(os.path.join(root, "VERSION")).read()
    ensure_synthetic_dataset(root, **{**SMALL, "num_val": 3})
    assert open(os.path.join(root, "VERSION")).read() != version
    assert len(os.listdir(os.path.join(root, "val"))) == 3
    with open(os.path.join(root, "annotations", "instances_val.json")) as f:
        assert len(json.load(f)["images"]) == 3
    assert os.listdir(tmp_path) == ["dge_synthetic"]  # no temporary or stale copies left


def test_processes_generating_at_once_agree_on_one_copy(tmp_path):
    root = str(tmp_path / "shared" / "dge_synthetic")
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.starmap(ensure_synthetic_dataset, [(root, 4, 2, (32, 48))] * 3)
    assert results == [root] * 3
    assert os.listdir(tmp_path / "shared") == ["dge_synthetic"]  # the losers' copies are gone
    reference = ensure_synthetic_dataset(str(tmp_path / "alone"), 4, 2, (32, 48))
    checksums = [open(os.path.join(r, "SHA1SUMS")).read() for r in (root, reference)]
    assert checksums[0] == checksums[1]
