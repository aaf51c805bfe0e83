"""Training augmentations of the semantic-segmentation recipe (PVT's Semantic FPN on ADE20K in
mmsegmentation, which the paper follows, Sec. 4.2.2): random scale of a 2048×512 box, a 512×512
crop that no single class dominates, flip and photometric distortion."""
from typing import List, Sequence, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["PhotometricDistortion", "RandomScaledBoxResize", "build_sem_seg_train_augmentation"]


class RandomScaledBoxResize(T.Augmentation):
    """Draw r ~ U(ratio_range) and resize the image, keeping its aspect ratio, to the largest size
    whose long side is at most ``long_edge·r`` and short side at most ``short_edge·r``, whatever
    the image's orientation: mmseg's ``Resize(img_scale=(long_edge, short_edge), ratio_range,
    keep_ratio=True)``."""

    def __init__(
        self, short_edge: int, long_edge: int, ratio_range: Tuple[float, float], interp: int = Image.BILINEAR
    ):
        super().__init__()
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(
                "INPUT.RATIO_RANGE_TRAIN must be (r_min, r_max) with 0 < r_min <= r_max; "
                f"got {tuple(ratio_range)}"
            )
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        ratio = np.random.uniform(*self.ratio_range)
        long_edge, short_edge = int(self.long_edge * ratio), int(self.short_edge * ratio)
        scale = min(long_edge / max(h, w), short_edge / min(h, w))
        return T.ResizeTransform(h, w, int(h * scale + 0.5), int(w * scale + 0.5), self.interp)


# (to HSV, from HSV) per channel order (INPUT.FORMAT).
_HSV_CONVERSIONS = {
    "RGB": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB),
    "BGR": (cv2.COLOR_BGR2HSV, cv2.COLOR_HSV2BGR),
}


def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotometricDistortion(T.Augmentation):
    """mmseg's ``PhotoMetricDistortion``: each step with probability 1/2, in this order:
    brightness (+δ, |δ| ≤ brightness_delta), contrast (×α) either here or last, saturation (×α),
    hue (+δ, in OpenCV's 0..180 hue units). The label map is left as it is.

    Args:
        image_format: "RGB" or "BGR", the channel order of the images it receives (INPUT.FORMAT).
    """

    def __init__(
        self,
        image_format: str = "RGB",
        brightness_delta: float = 32,
        contrast_range: Tuple[float, float] = (0.5, 1.5),
        saturation_range: Tuple[float, float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        if image_format not in _HSV_CONVERSIONS:
            raise ValueError(f"photometric distortion takes INPUT.FORMAT 'RGB' or 'BGR'; got {image_format!r}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        rng = np.random
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if rng.randint(2) else 0.0
        contrast_first = bool(rng.randint(2))
        contrast = rng.uniform(*self.contrast_range) if rng.randint(2) else 1.0
        saturation = rng.uniform(*self.saturation_range) if rng.randint(2) else 1.0
        hue = rng.randint(-self.hue_delta, self.hue_delta) if rng.randint(2) else 0
        to_hsv, from_hsv = _HSV_CONVERSIONS[self.image_format]

        def distort(img: np.ndarray) -> np.ndarray:
            """img: [H, W, 3] uint8 -> [H, W, 3] uint8."""
            if brightness:
                img = _affine(img, beta=brightness)
            if contrast_first and contrast != 1.0:
                img = _affine(img, alpha=contrast)
            if saturation != 1.0 or hue:
                hsv = cv2.cvtColor(np.ascontiguousarray(img), to_hsv)
                if saturation != 1.0:
                    hsv[..., 1] = _affine(hsv[..., 1], alpha=saturation)
                if hue:
                    hsv[..., 0] = (hsv[..., 0].astype(int) + hue) % 180
                img = cv2.cvtColor(hsv, from_hsv)
            if not contrast_first and contrast != 1.0:
                img = _affine(img, alpha=contrast)
            return img

        return T.ColorTransform(distort)


def build_sem_seg_train_augmentation(cfg) -> List[T.Augmentation]:
    """Training augmentations for semantic segmentation: the random resize (INPUT.RATIO_RANGE_TRAIN,
    else detectron2's ResizeShortestEdge), the crop (INPUT.CROP, avoiding crops that one class
    dominates), horizontal flip (INPUT.RANDOM_FLIP) and the photometric distortion
    (INPUT.PHOTOMETRIC_DISTORTION), in mmseg's order."""
    ratio_range: Sequence[float] = cfg.INPUT.RATIO_RANGE_TRAIN
    if ratio_range:
        if len(cfg.INPUT.MIN_SIZE_TRAIN) != 1:
            raise ValueError(
                "INPUT.RATIO_RANGE_TRAIN scales one box, so INPUT.MIN_SIZE_TRAIN must hold one size; "
                f"got {tuple(cfg.INPUT.MIN_SIZE_TRAIN)}"
            )
        augs = [RandomScaledBoxResize(cfg.INPUT.MIN_SIZE_TRAIN[0], cfg.INPUT.MAX_SIZE_TRAIN, tuple(ratio_range))]
    else:
        sampling = cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
        augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, sampling)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal", vertical=cfg.INPUT.RANDOM_FLIP == "vertical"
            )
        )
    if cfg.INPUT.PHOTOMETRIC_DISTORTION:
        augs.append(PhotometricDistortion(cfg.INPUT.FORMAT))
    return augs
