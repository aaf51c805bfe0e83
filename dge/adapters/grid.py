"""The token grid a stage's patch embedding records for blocks that are called without it."""
import functools
import importlib

from timm.models import register_notrace_module
from torch import nn

from .base import TokenGrid

__all__ = ["record_grid", "stop_recording"]


_PREFIX, _DOT = "Recording__", "__dot__"


@functools.lru_cache(maxsize=None)
def _grid_recording(cls: type) -> type:
    """A subclass of the patch embedding ``cls`` whose forward also records the grid: same
    parameters and keys, an FX leaf (a traced model records it too). It lives in this module
    under a name that encodes ``cls`` (``__getattr__`` below rebuilds it), so a patched model
    pickles (``torch.save(model)``) and unpickles in a fresh process."""

    def forward(self, x, *args, **kwargs):
        self.dge_grid.record(tuple(self.dynamic_feat_size((x.shape[-2], x.shape[-1]))))
        return cls.forward(self, x, *args, **kwargs)

    name = _PREFIX + f"{cls.__module__}.{cls.__qualname__}".replace(".", _DOT)
    recording = type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__, "__qualname__": name,
                                            "dge_base": cls})  # printed as cls, pickled by qualname
    register_notrace_module(recording)
    return recording


def __getattr__(name: str) -> type:
    """The recording subclass named ``name`` (pickle looks classes up by module and name)."""
    if not name.startswith(_PREFIX):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, qualname = name[len(_PREFIX):].replace(_DOT, ".").rpartition(".")
    cls = getattr(importlib.import_module(module), qualname)
    return _grid_recording(cls)


def record_grid(embed: nn.Module, grid: TokenGrid) -> None:
    """From now on ``embed`` (timm's ``PatchEmbed``: ``dynamic_feat_size``) writes its output
    grid to ``grid`` on every forward."""
    embed.__class__ = _grid_recording(type(embed))
    embed.dge_grid = grid


def stop_recording(embed: nn.Module) -> None:
    """Undoes ``record_grid``."""
    embed.__class__ = embed.dge_base
    del embed.dge_grid
