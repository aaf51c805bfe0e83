"""The predictor takes the image formats people pass and refuses the others in one line;
tools/predict.py skips (or, --strict, stops at) files that do not decode completely and images
it cannot resize, takes every image format in a folder and names what it leaves out."""
import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from dge.detectron2.data import UnreadableImage
from dge.detectron2.engine import Predictor, as_predictor_image
from train_helpers import run_args
import train_net


def test_accepted_formats_are_converted():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    assert as_predictor_image(rgb) is rgb
    grey = rgb[:, :, 0]
    for image in (grey, grey[:, :, None]):
        out = as_predictor_image(image)
        assert out.shape == (6, 7, 3) and (out == grey[:, :, None]).all()
    rgba = np.concatenate([rgb, np.full((6, 7, 1), 255, np.uint8)], axis=2)
    assert (as_predictor_image(rgba) == rgb).all()


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((6, 7, 3), np.float32), r"shape \(6, 7, 3\) and dtype float32; expected a uint8 .*\* 255"),
        (np.zeros((6, 7, 3), np.uint16), r"shape \(6, 7, 3\) and dtype uint16; expected a uint8"),
        (np.zeros((0, 0, 3), np.uint8), r"empty image \(shape \(0, 0, 3\)"),
        (np.zeros((6, 7, 2), np.uint8), r"shape \(6, 7, 2\) and dtype uint8; expected"),
        (np.zeros((2, 6, 7, 3), np.uint8), r"shape \(2, 6, 7, 3\)"),
        ([[0, 1]], r"got a list; expected"),
    ],
)
def test_other_inputs_are_refused_in_one_line(image, message):
    with pytest.raises(ValueError, match=message):
        as_predictor_image(image)


def test_predictor_runs_on_grey_and_rgba(tmp_path):
    cfg = train_net.setup(run_args("OUTPUT_DIR", str(tmp_path)))
    predictor = Predictor(cfg)
    grey = np.random.default_rng(1).integers(0, 256, (64, 80), dtype=np.uint8)
    for image in (grey, np.stack([grey] * 4, axis=2)):
        out = predictor(image)
        assert out["instances"].image_size == (64, 80) and "beta" in out["dge"]
    with pytest.raises(ValueError, match="dtype float32"):
        predictor(grey.astype(np.float32) / 255)


def test_predict_tool_skips_or_stops_at_a_truncated_jpeg(tmp_path):
    import predict

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / "good.jpg")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    data = open(folder / "cut.jpg", "rb").read()
    open(folder / "cut.jpg", "wb").write(data[: len(data) // 2])
    argv = ["--config-file", "configs/demo_pvt_dge_synthetic.yaml", "--input", str(folder), "--output", str(tmp_path / "out")]
    summary = predict.main(argv + ["MODEL.DEVICE", "cpu"])
    assert list(summary) == ["good"]
    with pytest.raises(UnreadableImage, match="cut.jpg: does not decode"):
        predict.main(argv + ["--strict", "MODEL.DEVICE", "cpu"])


def test_predict_tool_takes_every_image_in_a_folder_and_says_what_it_leaves(tmp_path, caplog):
    """A GIF in a folder is predicted; a text file and a subfolder are named; an image whose test
    resize leaves a side under the backbone's stride is skipped with its name and the cause, and
    predictions.json holds the rest; an empty folder warns."""
    import predict

    folder, out = tmp_path / "in", tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(4)
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / "anim.gif")
    Image.fromarray(rng.integers(0, 256, (2000, 20, 3), dtype=np.uint8)).save(folder / "thin.png")
    (folder / "notes.txt").write_text("not an image")
    argv = ["--config-file", "configs/demo_pvt_dge_synthetic.yaml", "--output", str(out), "MODEL.DEVICE", "cpu"]
    with caplog.at_level(logging.WARNING):
        summary = predict.main(["--input", str(folder)] + argv)
    assert list(summary) == ["anim"] and list(json.loads((out / "predictions.json").read_text())) == ["anim"]
    assert "left out 2 entries: notes.txt (not an image PIL recognises), sub (a folder: not searched)" in caplog.text
    assert re.search(r"skipped thin: 20x2000 resizes to \d+x\d+ under INPUT.MIN_SIZE_TEST .*stride 32", caplog.text)
    with pytest.raises(ValueError, match="thin: 20x2000 resizes to"):
        predict.main(["--input", str(folder), "--strict"] + argv)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert predict.main(["--input", str(folder / "sub")] + argv) == {}
    assert f"no images in ['{folder / 'sub'}']" in caplog.text
