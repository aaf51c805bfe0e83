"""A DetectionCheckpointer whose files are never half-written, that names the file and the
cause of a failed read or write, that loads weights of other DGE options only when allowed, and
that never saves (or loads) a model with NaN or inf in it."""
import glob
import os
from typing import Any, Dict, List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from dge.files import atomic_save, atomic_write_text
from dge.layers import allow_other_options, is_dge_state

__all__ = ["AtomicCheckpointer", "first_nonfinite", "load_weights", "remove_unfinished_writes"]

MIN_BACKBONE_SHARE = 0.1  # below this share of the backbone's tensors, a weights file is another model


def first_nonfinite(state: Dict[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state`` that holds a NaN or an inf;
    None when all are finite (one reduction per tensor and one read of the device)."""
    names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not names:
        return None
    device = state[names[0]].device
    finite = torch.stack([torch.isfinite(state[k]).all().to(device) for k in names])
    if bool(finite.all()):
        return None
    return names[int((~finite).nonzero()[0, 0])]


def remove_unfinished_writes(folder: str) -> List[str]:
    """Removes the checkpoint files (``*.pth.tmp``, ``last_checkpoint.tmp``) that an
    interrupted ``atomic_save`` left in ``folder`` (a process killed mid-write); returns
    their paths."""
    patterns = ("*.pth.tmp", "last_checkpoint.tmp")
    stale = sorted(path for pattern in patterns for path in glob.glob(os.path.join(folder, pattern)))
    for path in stale:
        os.remove(path)
    return stale


def _part(key: str) -> str:
    """Which part of a detectron2 DGE model a state-dict key belongs to, for messages."""
    if ".router." in key:
        return "routers"
    if not key.startswith("backbone."):
        return "heads"
    return "FPN" if "fpn" in key and not key.startswith("backbone.bottom_up.") else "backbone blocks"


def _load_summary(state: dict, incompatible, matched: int, backbone: int) -> str:
    """One line: how much of the backbone was loaded, which parts kept their initialisation
    (an ImageNet file: FPN and heads; a vanilla file: the routers) and which tensors were
    re-initialised for their shape (another class count: the class-dependent layers)."""
    kept = {}
    for k in incompatible.missing_keys:
        kept[_part(k)] = kept.get(_part(k), 0) + 1
    line = f"loaded {matched} of {backbone} backbone tensors and {len(state) - len(incompatible.missing_keys)} in all"
    if kept:
        line += "; at initialisation: " + ", ".join(f"{part} ({n} tensors)" for part, n in sorted(kept.items()))
    if incompatible.incorrect_shapes:
        shown = ", ".join(f"{k} {tuple(a)} in the file, {tuple(b)} here" for k, a, b in incompatible.incorrect_shapes[:3])
        line += f"; re-initialised for their shape: {shown}"
        if len(incompatible.incorrect_shapes) > 3:
            line += f" and {len(incompatible.incorrect_shapes) - 3} more"
    return line


class AtomicCheckpointer(DetectionCheckpointer):
    """Writes each checkpoint to ``<name>.pth.tmp``, renames it into place, and only then
    marks it as the last checkpoint (``last_checkpoint`` replaced by a rename too): a crash or
    a failed write leaves the previous one as the latest, and no temporary file."""

    def __init__(self, model, save_dir: str = "", *, allow_partial: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.allow_partial = allow_partial

    def _load_file(self, filename: str):
        try:
            loaded = super()._load_file(filename)
        except Exception as e:  # torch's message (a zip reader's) does not name the file
            raise RuntimeError(
                f"cannot read the checkpoint {filename} (truncated, or not a checkpoint): {type(e).__name__}: {e}"
            ) from e
        bad = first_nonfinite(loaded.get("model", {})) if isinstance(loaded, dict) else None
        if bad is not None:
            raise ValueError(f"the checkpoint {filename} holds NaN or inf (first in {bad}): it was saved after its "
                             "run diverged; load an earlier checkpoint")
        return loaded

    def _load_model(self, checkpoint):
        """detectron2's loading, then: a file that gives the backbone (almost) none of its
        tensors stops with what it holds and what the model expected, unless
        ``allow_partial`` (MODEL.ALLOW_PARTIAL_WEIGHTS, which also loads weights trained under
        other DGE options: ``dge.layers.allow_other_options``); otherwise one line says how
        much of the backbone and of the rest it loaded."""
        held = list(checkpoint.get("model", {}))
        with allow_other_options(self.allow_partial):
            incompatible = super()._load_model(checkpoint)  # DGE options: checked by each block as it loads
        self.last_incompatible = incompatible
        expected = [k for k in self.model.state_dict() if k.startswith("backbone.") and not is_dge_state(k)]
        if not expected:
            return incompatible
        bad = set(incompatible.missing_keys) | {k for k, *_ in incompatible.incorrect_shapes}
        matched = sum(k not in bad for k in expected)
        if matched < MIN_BACKBONE_SHARE * len(expected) and not self.allow_partial:
            raise ValueError(
                f"MODEL.WEIGHTS gives the backbone {matched} of its {len(expected)} tensors: the file holds "
                f"{len(held)} tensors such as {held[:4]}, the model expects names such as {expected[:3]}. "
                "It is a checkpoint of another architecture (convert ImageNet files with "
                "tools/convert_pretrained.py), or set MODEL.ALLOW_PARTIAL_WEIGHTS True to start from it anyway."
            )
        self.last_load_summary = _load_summary(self.model.state_dict(), incompatible, matched, len(expected))
        self.logger.info(self.last_load_summary)
        return incompatible

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        bad = first_nonfinite(data["model"])
        if bad is not None:  # a diverged model never becomes the last checkpoint
            last = self.get_checkpoint_file() if self.has_checkpoint() else "none"
            self.logger.error(f"not saving {basename}: {bad} holds NaN or inf (the run diverged); the last finite "
                              f"checkpoint is {last}")
            return
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))


def load_weights(model: nn.Module, cfg) -> AtomicCheckpointer:
    """Loads cfg.MODEL.WEIGHTS into ``model`` as train_net.py does (checked: the file, NaN,
    the backbone's share, DGE options; MODEL.ALLOW_PARTIAL_WEIGHTS relaxes the last two);
    returns the checkpointer (``last_incompatible``: what did not load)."""
    checkpointer = AtomicCheckpointer(model, allow_partial=cfg.MODEL.ALLOW_PARTIAL_WEIGHTS)
    checkpointer.load(cfg.MODEL.WEIGHTS, checkpointables=[])
    return checkpointer
