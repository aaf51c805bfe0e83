"""Dataset validation: bad images and annotations stop with the file and annotation named
before any training step, or are fixed and counted; image checks are cached."""
import json
import os
import shutil

import numpy as np
import pytest
import train_net
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from PIL import Image
from train_helpers import run_args

from dge.detectron2.data.validation import DatasetError, check_image, validate_records


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DGE_CACHE_DIR", str(tmp_path / "cache"))


def random_bytes_png(path, hw=(64, 80)):
    """A PNG whose header is fine and whose pixel data is random bytes."""
    Image.fromarray(np.full(hw + (3,), 128, np.uint8)).save(path)
    data = bytearray(open(path, "rb").read())
    start = data.index(b"IDAT") + 8
    data[start:-16] = np.random.default_rng(0).integers(0, 256, len(data) - 16 - start, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


def test_random_bytes_png_is_an_error_not_a_black_image(tmp_path):
    path = str(tmp_path / "noise.png")
    random_bytes_png(path)
    assert read_image(path, "BGR").max() == 0  # detectron2's reader: a black image, no error
    assert "does not decode" in check_image(path, 64, 80, full=True)
    with pytest.raises(DatasetError, match="noise.png: does not decode"):
        validate_records([{"file_name": path, "height": 64, "width": 80}], "noise", "full")


def test_missing_image_and_wrong_size_are_named(tmp_path):
    ok = str(tmp_path / "ok.png")
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(ok)
    records = [
        {"file_name": str(tmp_path / "gone.png"), "height": 10, "width": 20},
        {"file_name": ok, "height": 20, "width": 10},
    ]
    with pytest.raises(DatasetError) as e:
        validate_records(records, "bad", "headers")
    assert "gone.png: file does not exist" in str(e.value)
    assert "ok.png: is 20×10 (W×H), the dataset records 10×20" in str(e.value)
    assert "2 errors" in str(e.value)


def _record(path, anns):
    return {"file_name": path, "height": 40, "width": 60, "annotations": anns}


def _ann(box, poly=None):
    ann = {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": 0}
    if poly is not None:
        ann["segmentation"] = [poly]
    return ann


def test_box_outside_image_is_an_error_or_clipped_with_its_mask(tmp_path):
    path = str(tmp_path / "img.png")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(path)
    outside = _ann([-30, -30, 90, 70], [-30, -30, 20, -30, 20, 20, -30, 20])  # box and polygon outside
    records = [_record(path, [outside, _ann([5, 5, 5, 9]), _ann([1, 1, 9, 9], [1, 1, 2, 2])])]
    with pytest.raises(DatasetError, match=r"img.png annotation 0: box \[-30, -30, 90, 70\] .* outside the 60×40 image"):
        validate_records(records, "boxes", "headers", "error")
    fixed, report = validate_records(records, "boxes", "headers", "clip")
    anns = fixed[0]["annotations"]
    assert report.boxes_clipped == 1 and report.zero_area_dropped == 2 and report.polygons_dropped == 1
    assert len(anns) == 1 and anns[0]["bbox"] == [0.0, 0.0, 60, 40]
    poly = np.asarray(anns[0]["segmentation"][0]).reshape(-1, 2)
    assert poly.min() >= 0 and poly[:, 0].max() <= 60 and poly[:, 1].max() <= 40
    assert "1 boxes clipped to their image, 2 zero-area boxes and 1 degenerate polygons dropped" in report.summary()


def test_image_checks_are_cached_per_file_set(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths[-1])
    records = [{"file_name": p, "height": 8, "width": 8} for p in paths]
    assert validate_records(records, "c", "full")[1].images_checked == 3
    assert validate_records(records, "c", "full")[1].cached
    random_bytes_png(paths[1], (8, 8))  # a changed file: checked again
    with pytest.raises(DatasetError, match="1.png: does not decode"):
        validate_records(records, "c", "full")


def _copy_dataset(data_root, tmp_path, name, edit):
    """The synthetic train split copied under ``name``, its records edited by ``edit(images, anns, folder)``."""
    DatasetCatalog.get("dge_synthetic_train")  # generated on first use
    src = json.load(open(os.path.join(data_root, "annotations", "instances_train.json")))
    folder = tmp_path / name
    shutil.copytree(os.path.join(data_root, "train"), folder)
    edit(src["images"], src["annotations"], folder)
    ann_file = tmp_path / f"{name}.json"
    ann_file.write_text(json.dumps(src))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(ann_file), str(folder))
    return name


@pytest.mark.parametrize("case", ["random_bytes", "missing"])
def test_training_stops_before_the_first_step(data_root, tmp_path, case):
    def edit(images, anns, folder):
        target = folder / images[3]["file_name"]
        if case == "missing":
            os.remove(target)
        else:
            random_bytes_png(str(target), (images[3]["height"], images[3]["width"]))

    name = _copy_dataset(data_root, tmp_path, f"dge_test_{case}", edit)
    cfg = train_net.setup(run_args("DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)))
    message = "file does not exist" if case == "missing" else "does not decode"
    with pytest.raises(DatasetError, match=message):
        train_net.Trainer(cfg)


def test_a_broken_evaluation_set_stops_training_before_it_starts(data_root, tmp_path, monkeypatch):
    def edit(images, anns, folder):
        os.remove(folder / images[0]["file_name"])

    name = _copy_dataset(data_root, tmp_path, "dge_test_broken_val", edit)
    started = []
    monkeypatch.setattr(train_net.Trainer, "train", lambda self: started.append(True))
    with pytest.raises(DatasetError, match="dge_test_broken_val.*file does not exist"):
        train_net.main(run_args("DATASETS.TEST", f"('{name}',)", "OUTPUT_DIR", str(tmp_path / "out")))
    assert not started


def test_a_tiny_test_size_is_warned_about():
    from dge.config import load_config

    with pytest.warns(UserWarning, match="INPUT.MIN_SIZE_TEST 8 is below 64 px"):
        load_config("configs/demo_pvt_dge_synthetic.yaml", ["INPUT.MIN_SIZE_TEST", 8])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config("configs/demo_pvt_dge_synthetic.yaml")  # the demo's sizes: no warning
