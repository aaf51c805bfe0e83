"""detectron2's DefaultPredictor with input checks: the image formats people pass are
converted, the others are refused with one line that says what was given and what is
expected (detectron2 itself fails deep inside, or predicts on what it sees as black)."""
import logging

import numpy as np
from detectron2.engine import DefaultPredictor

from dge.config import load_config
from dge.layers import allow_other_options

__all__ = ["Predictor", "as_predictor_image", "tool_predictor"]

logger = logging.getLogger(__name__)
EXPECTED = "expected a uint8 numpy image H×W×3 (in cfg.INPUT.FORMAT, BGR by default), H×W / H×W×1 grey or H×W×4"
_said = set()


def _once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning(message)


def as_predictor_image(image) -> np.ndarray:
    """``image`` as uint8 H×W×3: grey (H×W, H×W×1) repeated to 3 channels, RGBA/BGRA without
    its alpha (said once); raises ValueError for anything else."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"got a {type(image).__name__}; {EXPECTED}")
    described = f"shape {tuple(image.shape)} and dtype {image.dtype}"
    if image.dtype != np.uint8:
        hint = " (a float image in 0..1: (image * 255).round().astype(np.uint8))" if image.dtype.kind == "f" else ""
        raise ValueError(f"got an image of {described}; {EXPECTED}{hint}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"got an image of {described}; {EXPECTED}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"got an empty image ({described}); {EXPECTED}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        _once("the predictor drops the alpha channel of 4-channel images")
        return np.ascontiguousarray(image[:, :, :3])
    return image


class Predictor(DefaultPredictor):
    """``DefaultPredictor(cfg)`` that checks and converts its input (``as_predictor_image``);
    weights of other DGE options load under MODEL.ALLOW_PARTIAL_WEIGHTS only, keeping this
    model's routers (detectron2's own predictor refuses them too; it loads them inside
    ``with dge.allow_other_options():``)."""

    def __init__(self, cfg):
        with allow_other_options(cfg.MODEL.get("ALLOW_PARTIAL_WEIGHTS", False)):
            super().__init__(cfg)

    def __call__(self, original_image):
        return super().__call__(as_predictor_image(original_image))


def tool_predictor(config_file: str, opts, untrained: str) -> "Predictor":
    """A tool's predictor: ``config_file`` with its KEY VALUE ``opts`` (frozen; ``.cfg``);
    without MODEL.WEIGHTS it warns "MODEL.WEIGHTS is empty: <untrained>"."""
    cfg = load_config(config_file, opts)
    cfg.freeze()
    if not cfg.MODEL.WEIGHTS:
        logger.warning(f"MODEL.WEIGHTS is empty: {untrained}")
    return Predictor(cfg)
