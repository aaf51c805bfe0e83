"""The predictor takes the image formats people pass and refuses the others in one line;
tools/predict.py skips (or, --strict, stops at) files that do not decode completely."""
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
