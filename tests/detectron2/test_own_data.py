"""README's "Train on your own data": a COCO-format folder registered with train_net.py's
--register-coco trains and evaluates like the built-in data."""
import os

import pytest

import train_net
from dge.detectron2.data import generate_synthetic_coco, register_coco_dataset
from train_helpers import DEMO, FAST
from train_helpers import read_metrics


def test_a_coco_folder_trains_and_evaluates_through_register_coco(tmp_path):
    root = str(tmp_path / "mine")
    for split, n in (("train", 6), ("val", 2)):
        generate_synthetic_coco(root, split, n, seed=3, image_size=(128, 160))
    out = str(tmp_path / "run")
    argv = ["--config-file", DEMO]
    for split in ("train", "val"):
        argv += ["--register-coco", f"mine_{split}", f"{root}/annotations/instances_{split}.json", f"{root}/{split}"]
    argv += FAST + [
        "DATASETS.TRAIN", '("mine_train",)', "DATASETS.TEST", '("mine_val",)', "MODEL.ROI_HEADS.NUM_CLASSES", "5",
        "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out,
    ]
    train_net.main(train_net.argument_parser().parse_args(argv))
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert {"bbox/AP", "routing/beta"} <= set(read_metrics(out)[-1])  # evaluated on mine_val
    assert "dataset 'mine_train': 6 images" in open(os.path.join(out, "log.txt")).read()


def test_register_coco_names_a_missing_file_and_a_taken_name(tmp_path):
    root = str(tmp_path / "mine")
    generate_synthetic_coco(root, "val", 1, seed=3, image_size=(64, 80))
    json_file = f"{root}/annotations/instances_val.json"
    with pytest.raises(FileNotFoundError, match="the annotation file '/nowhere.json' does not exist"):
        register_coco_dataset("dge_test_missing", "/nowhere.json", root)
    register_coco_dataset("dge_test_taken", json_file, f"{root}/val")
    register_coco_dataset("dge_test_taken", json_file, f"{root}/val")  # the same files: nothing to do
    with pytest.raises(ValueError, match="already registered"):
        register_coco_dataset("dge_test_taken", json_file, root)


def test_a_class_count_that_differs_from_the_datasets_is_named(tmp_path):
    root = str(tmp_path / "mine")
    generate_synthetic_coco(root, "train", 2, seed=3, image_size=(64, 80))
    argv = ["--config-file", DEMO, "--register-coco", "dge_test_classes", f"{root}/annotations/instances_train.json",
            f"{root}/train"] + FAST + ["DATASETS.TRAIN", '("dge_test_classes",)', "DATASETS.TEST", "()",
                                       "MODEL.ROI_HEADS.NUM_CLASSES", "3", "OUTPUT_DIR", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"has 5 classes \(disc, square, .*NUM_CLASSES is 3: set it to 5"):
        train_net.main(train_net.argument_parser().parse_args(argv))
