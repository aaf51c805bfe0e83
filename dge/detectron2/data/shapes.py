"""Rendering of the built-in synthetic dataset (``synthetic.py`` manages and registers it):
coloured shapes on partly flat, partly textured backgrounds, with their polygon masks and
label maps, as one COCO split."""
import colorsys
import json
import os
import zlib
from typing import Iterable, List, Tuple

import cv2
import numpy as np
from PIL import Image

__all__ = ["SYNTHETIC_CLASSES", "DEFAULT_IMAGE_SIZE", "DEFAULT_NUM_TRAIN", "DEFAULT_NUM_VAL", "SPLITS", "generate_synthetic_coco"]

# Category k + 1 (COCO id and semantic label) is SYNTHETIC_CLASSES[k].
SYNTHETIC_CLASSES = ["disc", "square", "triangle", "ring", "cross"]
DEFAULT_IMAGE_SIZE = (256, 320)
DEFAULT_NUM_TRAIN = 2000
DEFAULT_NUM_VAL = 96
SPLITS = ("train", "val")

# Object size (diameter / side) as a fraction of the image's shorter side, and count per image.
_OBJECT_SIZE_RANGE = (0.12, 0.40)
_MAX_OBJECTS = 6
# An object is dropped (and not drawn) when less than this many pixels, or less than this
# fraction of its unoccluded in-image area, would remain visible.
_MIN_VISIBLE_PIXELS = 16
_MIN_VISIBLE_FRACTION = 0.25
# Fraction of the image covered by textured background patches.
_TEXTURED_BACKGROUND_RANGE = (0.25, 0.5)
# Steepest background gradient, in grey levels per pixel: gentle enough that an 8x8 block of it
# is flat to within a grey level or two.
_MAX_GRADIENT_SLOPE = 0.25


def _pixel_grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each [H, W] float64, in pixels."""
    ys, xs = np.mgrid[0:height, 0:width]
    return xs + 0.5, ys + 0.5


def _random_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """
    A zero-mean pattern of a random kind (noise, stripes or checkerboard) at a random scale
    and orientation. Returns [H, W] float64 in [-1, 1]. Stripe periods (4-12 px) and checker
    cells (3-6 px) are below 8 px so that no 8x8 block of a texture is flat.
    """
    kind = rng.integers(3)
    if kind == 0:
        return np.clip(rng.normal(0.0, 0.5, size=(height, width)), -1.0, 1.0)
    xs, ys = _pixel_grid(height, width)
    angle = rng.uniform(0.0, np.pi)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    if kind == 1:
        return np.sin(2.0 * np.pi * u / rng.uniform(4.0, 12.0))
    v = -xs * np.sin(angle) + ys * np.cos(angle)
    cell = rng.uniform(3.0, 6.0)
    return ((np.floor(u / cell) + np.floor(v / cell)) % 2) * 2.0 - 1.0


def _dull_colour(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation RGB colour for backgrounds: [3] float64 in [0, 255]."""
    return rng.uniform(60.0, 190.0) + rng.uniform(-20.0, 20.0, size=3)


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated RGB colour for objects: [3] float64 in [0, 255]."""
    rgb = colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return np.array(rgb) * 255.0


def _render_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """
    A flat or gently sloped base colour, with textured rectangles covering 25-50% of it.
    Returns [H, W, 3] float64 in grey levels.
    """
    xs, ys = _pixel_grid(height, width)
    image = np.broadcast_to(_dull_colour(rng), (height, width, 3)).copy()
    if rng.uniform() < 0.5:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = (xs - width / 2) * np.cos(angle) + (ys - height / 2) * np.sin(angle)
        slopes = rng.uniform(-_MAX_GRADIENT_SLOPE, _MAX_GRADIENT_SLOPE, size=3)
        image += t[..., None] * slopes

    textured = np.zeros((height, width), dtype=bool)
    target = rng.uniform(*_TEXTURED_BACKGROUND_RANGE)
    while textured.mean() < target:
        h = int(rng.uniform(0.25, 0.6) * height)
        w = int(rng.uniform(0.25, 0.6) * width)
        y0 = rng.integers(0, height - h + 1)
        x0 = rng.integers(0, width - w + 1)
        patch = np.zeros_like(textured)
        patch[y0 : y0 + h, x0 : x0 + w] = True
        pattern = _random_texture(rng, height, width)
        colour = _dull_colour(rng) + rng.uniform(25.0, 50.0) * pattern[..., None]
        image[patch] = colour[patch]
        textured |= patch
    return image


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """
    Args:
        shape: one of SYNTHETIC_CLASSES.
        u, v: [H, W] pixel-centre coordinates in the object's rotated frame, centred on it.
        size: the object's diameter (disc, ring), side (square) or span (triangle, cross), in px.
    Returns:
        [H, W] bool mask of the full, unoccluded object.
    """
    r = size / 2
    if shape == "disc":
        return u**2 + v**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= r
    if shape == "triangle":
        # Equilateral with circumradius r: three half-planes at the inradius r / 2.
        angles = 2.0 * np.pi * np.arange(3) / 3
        return np.all([u * np.cos(a) + v * np.sin(a) <= r / 2 for a in angles], axis=0)
    if shape == "ring":
        d2 = u**2 + v**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        return (np.maximum(np.abs(u), np.abs(v)) <= r) & (np.minimum(np.abs(u), np.abs(v)) <= r / 3)
    raise ValueError(f"shape must be one of {SYNTHETIC_CLASSES}; got {shape!r}")


def _render_image(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, np.ndarray]]]:
    """
    Draw 1-6 objects, in order, over a background. Objects that would be hidden too much by
    later ones are left out entirely, so the picture and the annotations agree.

    Returns:
        image: [H, W, 3] uint8 RGB.
        labels: [H, W] uint8, 0 = background, else the category id of the visible object.
        objects: (category id, visible mask [H, W] bool) per drawn object, in drawing order.
    """
    image = _render_background(rng, height, width)
    xs, ys = _pixel_grid(height, width)
    short_side = min(height, width)
    shapes, masks = [], []
    for _ in range(rng.integers(1, _MAX_OBJECTS + 1)):
        category = int(rng.integers(len(SYNTHETIC_CLASSES)))
        size = rng.uniform(*_OBJECT_SIZE_RANGE) * short_side
        cx = rng.uniform(size / 4, width - size / 4)
        cy = rng.uniform(size / 4, height - size / 4)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
        colour = _vivid_colour(rng)
        if rng.uniform() < 0.5:
            pattern = _random_texture(rng, height, width)
            colour = colour + rng.uniform(20.0, 45.0) * pattern[..., None]
        shapes.append((category, colour))
        masks.append(_shape_mask(SYNTHETIC_CLASSES[category], u, v, size))

    # owner[y, x]: index of the topmost object at that pixel, -1 for background.
    def paint_owners(indices: Iterable[int]) -> np.ndarray:
        owner = np.full((height, width), -1)
        for i in indices:
            owner[masks[i]] = i
        return owner

    owner = paint_owners(range(len(masks)))
    kept = [
        i
        for i, mask in enumerate(masks)
        if (owner == i).sum() >= max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * mask.sum())
    ]
    owner = paint_owners(kept)
    labels = np.zeros((height, width), dtype=np.uint8)
    objects = []
    for i in kept:
        category, colour = shapes[i]
        visible = owner == i
        image[visible] = np.broadcast_to(colour, image.shape)[visible]
        labels[visible] = category + 1
        objects.append((category + 1, visible))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels, objects


def _mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """
    Exact COCO polygons of a binary mask, holes included.

    Contours are traced on the mask upsampled 2x, so each vertex lies a quarter pixel inside
    the mask's pixel edges and rasterising the polygons (pycocotools, detectron2) gives back
    exactly the same pixels. COCO polygons cannot have holes and several polygons are merged
    by union, so each hole is joined to its outer contour by a zero-width cut; the rasterisers'
    even-odd rule then leaves it empty.

    Args:
        mask: [H, W] bool.
    Returns:
        a list of flat [x0, y0, x1, y1, ...] lists in pixel coordinates, one per component.
    """
    upsampled = np.kron(mask.astype(np.uint8), np.ones((2, 2), dtype=np.uint8))
    contours, hierarchy = cv2.findContours(upsampled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    if hierarchy is None:
        return polygons
    # hierarchy[i] = (next, previous, first child, parent); with RETR_CCOMP children are holes.
    hierarchy = hierarchy[0]
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1:
            continue
        ring = contour.reshape(-1, 2)
        hole_index = hierarchy[i][2]
        while hole_index != -1:
            hole = contours[hole_index].reshape(-1, 2)
            distances = ((ring[:, None, :] - hole[None, :, :]) ** 2).sum(-1)
            a, b = np.unravel_index(np.argmin(distances), distances.shape)
            ring = np.concatenate([ring[: a + 1], hole[b:], hole[: b + 1], ring[a:]])
            hole_index = hierarchy[hole_index][0]
        polygons.append(((ring + 0.5) / 2).ravel().tolist())
    return polygons


def generate_synthetic_coco(
    root: str,
    split: str,
    num_images: int,
    seed: int,
    image_size: Tuple[int, int] = DEFAULT_IMAGE_SIZE,
) -> str:
    """
    Generate one split: PNG images under ``root/<split>/``, label maps under
    ``root/sem_seg/<split>/`` and COCO instance annotations (polygon masks) in
    ``root/annotations/instances_<split>.json``. The same (split, num_images, seed, image_size)
    always gives the same files; different splits draw different images from one seed.

    Args:
        image_size: (height, width) in pixels.
    Returns:
        the path of the annotation json.
    """
    height, width = image_size
    image_dir = os.path.join(root, split)
    label_dir = os.path.join(root, "sem_seg", split)
    json_path = os.path.join(root, "annotations", f"instances_{split}.json")
    for folder in (image_dir, label_dir, os.path.dirname(json_path)):
        os.makedirs(folder, exist_ok=True)

    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
        image, labels, objects = _render_image(rng, height, width)
        file_name = f"{index:06d}.png"
        Image.fromarray(image).save(os.path.join(image_dir, file_name))
        Image.fromarray(labels).save(os.path.join(label_dir, file_name))
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        for category_id, visible in objects:
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": index + 1,
                    "category_id": category_id,
                    "segmentation": _mask_to_polygons(visible),
                    # The polygons rasterise to exactly `visible`, so this is their box too.
                    "bbox": [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0],
                    "area": int(visible.sum()),
                    "iscrowd": 0,
                }
            )
    dataset = {
        "info": {"description": f"dge synthetic shapes, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"}
            for k, name in enumerate(SYNTHETIC_CLASSES)
        ],
    }
    with open(json_path, "w") as f:
        json.dump(dataset, f, separators=(",", ":"))
    return json_path
