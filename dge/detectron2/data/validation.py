"""Dataset validation before training and evaluation: every image there and readable with
its recorded size, every annotation inside its image, degenerate ones counted.

``DATALOADER.CHECK_IMAGES``: "none", "headers" (the file exists, its header gives the
recorded size) or "full" (the file decodes completely: Pillow's ``load()`` raises on
truncated or corrupt data, which detectron2's reader turns into a black image). Image
checks run in threads and are cached under ``$DGE_CACHE_DIR`` (default
``~/.cache/dge/validation``), keyed by every file's path, size and mtime and the mode: a
second start checks nothing again. ``DATALOADER.BOX_OUTSIDE_IMAGE``: "error" stops on a box
that reaches more than one pixel outside its image; "clip" clips it to the image and its
polygons to the clipped box. Zero-area boxes and degenerate polygons (fewer than 3 points
or no area) are dropped and counted; crowd annotations are left as they are.
"""
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
from detectron2.structures import BoxMode
from PIL import Image

from dge.files import atomic_write_text

__all__ = ["CHECK_MODES", "BOX_POLICIES", "DatasetError", "ValidationReport", "check_image", "validate_records"]

CHECK_MODES = ("none", "headers", "full")
BOX_POLICIES = ("error", "clip")
TOLERANCE = 1.0  # pixels a box may reach outside its image (rounding in annotation tools)
logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be trained or evaluated on as it is."""


@dataclass
class ValidationReport:
    name: str
    mode: str
    images: int = 0
    images_checked: int = 0
    cached: bool = False
    annotations: int = 0
    boxes_clipped: int = 0
    zero_area_dropped: int = 0
    polygons_dropped: int = 0
    errors: List[str] = field(default_factory=list)

    def summary(self) -> str:
        checked = "from cache" if self.cached else f"{self.images_checked} checked ({self.mode})"
        return (
            f"dataset {self.name!r}: {self.images} images ({checked}), {self.annotations} annotations; "
            f"{self.boxes_clipped} boxes clipped to their image, {self.zero_area_dropped} zero-area boxes "
            f"and {self.polygons_dropped} degenerate polygons dropped; {len(self.errors)} errors"
        )


def check_image(path: str, height: Optional[int], width: Optional[int], full: bool) -> Optional[str]:
    """None when ``path`` is an image of the recorded size (EXIF rotation allowed), else why not."""
    if not os.path.isfile(path):
        return f"{path}: file does not exist"
    try:
        with Image.open(path) as im:
            size = im.size
            if full:
                im.load()
            rotated = im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad files
        return f"{path}: does not decode ({type(e).__name__}: {e})"
    if height and width:
        expected = {(width, height), (height, width)} if rotated else {(width, height)}
        if size not in expected:
            return f"{path}: is {size[0]}×{size[1]} (W×H), the dataset records {width}×{height}"
    return None


def _cache_path(records: Sequence[dict], mode: str) -> str:
    digest = hashlib.sha256(mode.encode())
    for r in records:
        try:
            st = os.stat(r["file_name"])
            digest.update(f"{r['file_name']}|{st.st_size}|{st.st_mtime_ns}|{r.get('height')}|{r.get('width')}".encode())
        except OSError:
            digest.update(f"{r['file_name']}|missing".encode())
    root = os.environ.get("DGE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "dge", "validation"))
    return os.path.join(root, digest.hexdigest()[:32] + ".json")


def _check_images(records: Sequence[dict], mode: str, report: ValidationReport) -> List[str]:
    cache = _cache_path(records, mode)
    if os.path.isfile(cache):
        with open(cache) as f:
            report.cached = True
            return json.load(f)["errors"]
    jobs = [(r["file_name"], r.get("height"), r.get("width"), mode == "full") for r in records]
    progress = None
    if len(jobs) > 2000:
        from tqdm import tqdm

        progress = tqdm(total=len(jobs), desc=f"checking {report.name}", unit="img")
    errors = []
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        for error in pool.map(lambda job: check_image(*job), jobs, chunksize=64):
            errors.append(error)
            if progress is not None:
                progress.update(1)
    if progress is not None:
        progress.close()
    report.images_checked = len(jobs)
    errors = [e for e in errors if e]
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write_text(json.dumps({"errors": errors}), cache)
    return errors


def _polygon_area(poly: Sequence[float]) -> float:
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _fix_annotation(
    ann: dict, where: str, hw: Tuple[int, int], policy: str, report: ValidationReport
) -> Optional[dict]:
    """The annotation as it trains (clipped, degenerate polygons removed), None to drop it."""
    h, w = hw
    x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
    seg = ann.get("segmentation")
    if x0 < -TOLERANCE or y0 < -TOLERANCE or x1 > w + TOLERANCE or y1 > h + TOLERANCE:
        if policy == "error":
            report.errors.append(
                f"{where}: box {[round(v, 1) for v in (x0, y0, x1, y1)]} (XYXY) reaches outside the {w}×{h} image "
                "(DATALOADER.BOX_OUTSIDE_IMAGE clip: clip it and its mask)"
            )
            return None
        report.boxes_clipped += 1
    x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
    y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        report.zero_area_dropped += 1
        return None
    ann = dict(ann, bbox=[x0, y0, x1, y1], bbox_mode=BoxMode.XYXY_ABS)
    if isinstance(seg, list):  # polygons (RLE masks are left as they are)
        kept = []
        for poly in seg:
            poly = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            poly[:, 0] = poly[:, 0].clip(x0, x1)
            poly[:, 1] = poly[:, 1].clip(y0, y1)
            if len(poly) >= 3 and _polygon_area(poly.reshape(-1)) > 0:
                kept.append(poly.reshape(-1).tolist())
            else:
                report.polygons_dropped += 1
        if not kept:
            report.zero_area_dropped += 1
            return None
        ann["segmentation"] = kept
    return ann


def validate_records(
    records: List[dict], name: str, mode: str = "headers", box_policy: str = "error"
) -> Tuple[List[dict], ValidationReport]:
    """Checks ``records`` (detectron2 dataset dicts) and returns them as they will train, with
    the report; raises ``DatasetError`` listing the first problems when there is an error."""
    if mode not in CHECK_MODES:
        raise ValueError(f"DATALOADER.CHECK_IMAGES must be one of {CHECK_MODES}; got {mode!r}")
    if box_policy not in BOX_POLICIES:
        raise ValueError(f"DATALOADER.BOX_OUTSIDE_IMAGE must be one of {BOX_POLICIES}; got {box_policy!r}")
    report = ValidationReport(name=name, mode=mode, images=len(records))
    if mode != "none":
        report.errors.extend(_check_images(records, mode, report))
    fixed = []
    for r in records:
        anns = r.get("annotations")
        if anns is None or "height" not in r or "width" not in r:
            fixed.append(r)
            continue
        kept = []
        for k, ann in enumerate(anns):
            report.annotations += 1
            if ann.get("iscrowd", 0):
                kept.append(ann)
                continue
            where = f"{r['file_name']} annotation {k}" + (f" (id {ann['id']})" if "id" in ann else "")
            out = _fix_annotation(ann, where, (r["height"], r["width"]), box_policy, report)
            if out is not None:
                kept.append(out)
        fixed.append(dict(r, annotations=kept))
    logger.info(report.summary())
    if report.errors:
        shown = "\n  ".join(report.errors[:10])
        more = f"\n  ... and {len(report.errors) - 10} more" if len(report.errors) > 10 else ""
        raise DatasetError(f"{report.summary()}:\n  {shown}{more}")
    return fixed, report
