"""A DetectionCheckpointer whose files are never half-written."""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer", "atomic_save"]


def atomic_save(obj, path: str) -> None:
    """``torch.save`` to ``path + ".tmp"``, flushed to disk, then renamed over ``path``: a crash
    leaves the previous file whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AtomicCheckpointer(DetectionCheckpointer):
    """Writes each checkpoint to ``<name>.pth.tmp``, renames it into place, and only then
    marks it as the last checkpoint: a crash leaves the previous one as the latest."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_save(data, save_file)
        self.tag_last_checkpoint(basename)
