"""Images for the tools: files, folders, registered datasets, or the real photographs that
scikit-image ships (``skimage:chelsea``)."""
import logging
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .validation import check_image

__all__ = ["DEFAULT_PHOTOS", "UnreadableImage", "add_image_arguments", "iter_images"]

# Real photographs inside the scikit-image package (no download).
DEFAULT_PHOTOS = ("skimage:chelsea", "skimage:astronaut", "skimage:coffee", "skimage:rocket")
logger = logging.getLogger(__name__)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UnreadableImage(ValueError):
    """An input file that is not a completely decodable image."""


def _read_bgr(path: str) -> np.ndarray:
    import cv2

    problem = check_image(path, None, None, full=True)  # OpenCV reads a truncated JPEG with a warning only
    if problem:
        raise UnreadableImage(problem)
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise UnreadableImage(f"{path}: OpenCV cannot read it")
    return image


def _folder_images(folder: str) -> List[str]:
    """The images of ``folder``, sorted: files with an image extension and any other file that
    PIL recognises as an image (a GIF, a PPM ...); one warning names what it leaves out, and why."""
    from PIL import Image

    images, left = [], []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not os.path.isfile(path):
            left.append(f"{entry} (a folder: not searched)")
        elif entry.lower().endswith(_IMAGE_EXTS):
            images.append(path)
        else:
            try:
                with Image.open(path):  # reads the header only
                    images.append(path)
            except Exception:
                left.append(f"{entry} (not an image PIL recognises)")
    if left:
        more = f" and {len(left) - 5} more" if len(left) > 5 else ""
        logger.warning(f"{folder}: left out {len(left)} entries: {', '.join(left[:5])}{more}")
    return images


def _sources(inputs: Sequence[str], dataset: Optional[str]) -> List[str]:
    sources = []
    for item in inputs:
        if item.startswith("skimage:"):
            sources.append(item)
        elif os.path.isdir(item):
            sources += _folder_images(item)
        elif os.path.isfile(item):
            sources.append(item)
        else:
            raise FileNotFoundError(f"input {item!r} is not an image file, a folder or skimage:NAME")
    if dataset:
        from detectron2.data import DatasetCatalog

        sources += [d["file_name"] for d in DatasetCatalog.get(dataset)]
    return sources


def _unique_names(sources: Sequence[str]) -> List[str]:
    """The sources' names (file stems; NAME of skimage:NAME), made unique: a stem an earlier
    source has gets _2, _3, ... (``x.png``, ``x.jpg`` -> x, x_2), said in one warning."""
    names, used, renamed = [], set(), []
    for src in sources:
        base = src.split(":", 1)[1] if src.startswith("skimage:") else os.path.splitext(os.path.basename(src))[0]
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        names.append(name)
        if name != base:
            renamed.append(f"{src} as {name!r}")
    if renamed:
        more = f" and {len(renamed) - 5} more" if len(renamed) > 5 else ""
        logger.warning(
            f"{len(renamed)} inputs have the name of an earlier one; so that no output is overwritten they are "
            f"named apart: {', '.join(renamed[:5])}{more}"
        )
    return names


def _load(src: str) -> np.ndarray:
    if not src.startswith("skimage:"):
        return _read_bgr(src)
    import skimage.data

    name = src.split(":", 1)[1]
    if not hasattr(skimage.data, name):
        raise ValueError(f"scikit-image ships no image {name!r}")
    rgb = getattr(skimage.data, name)()
    rgb = np.stack([rgb] * 3, -1) if rgb.ndim == 2 else rgb[..., :3]
    return np.ascontiguousarray(rgb[..., ::-1])


def iter_images(
    inputs: Sequence[str] = (),
    dataset: Optional[str] = None,
    max_images: Optional[int] = None,
    skipped: Optional[List[str]] = None,
) -> Iterator[Tuple[str, np.ndarray]]:
    """Yields (name, BGR uint8 [H, W, 3]) for each input: an image file, a folder (its
    images, sorted), ``skimage:NAME`` (``skimage.data.NAME()``), then the images of the
    registered ``dataset``; at most ``max_images`` in all. Names are the file stems, unique
    (``_unique_names``). A file that does not decode completely raises ``UnreadableImage``,
    or, with a ``skipped`` list, is appended to it (with why) and skipped."""
    sources = _sources(inputs, dataset)
    if not sources:
        logger.warning(f"no images in {list(inputs)}" + (f" or in the dataset {dataset!r}" if dataset else ""))
    count = 0
    for src, name in zip(sources, _unique_names(sources)):
        if max_images is not None and count >= max_images:
            return
        try:
            image = _load(src)
        except UnreadableImage as e:
            if skipped is None:
                raise
            skipped.append(str(e))
            continue
        yield name, image
        count += 1


def add_image_arguments(parser, output: str) -> None:
    """The image-input options of the tools: ``--input``, ``--dataset``, ``--max-images`` (read
    them with ``iter_images``) and ``--output`` (default ``output``)."""
    parser.add_argument("--input", nargs="*", default=[], help="image files, folders or skimage:NAME")
    parser.add_argument("--dataset", help="a registered dataset to take images from")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--output", default=output)
