"""Checkpoints of the classification trainer: written atomically, read without unpickling
code (``weights_only=True``), with the random state that lets ``--resume`` continue exactly."""
import os
import random
from typing import Any, Dict

import numpy as np
import torch

from ..files import atomic_save

__all__ = ["load_checkpoint", "rng_state", "set_rng_state"]


def load_checkpoint(path: str) -> Dict[str, Any]:
    """A checkpoint written by ``atomic_save`` (on the CPU)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, pickle.UnpicklingError, EOFError, ... for bad files
        raise RuntimeError(f"could not read checkpoint {path!r} ({type(e).__name__}: {e})") from e


def rng_state() -> Dict[str, Any]:
    """The global random states (Python, NumPy, torch CPU and CUDA) as plain data and tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
