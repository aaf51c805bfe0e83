"""The token grid a stage's patch embedding records for blocks that are called without it."""
import functools

from timm.models import register_notrace_module
from torch import nn

from .base import TokenGrid

__all__ = ["record_grid", "stop_recording"]


@functools.lru_cache(maxsize=None)
def _grid_recording(cls: type) -> type:
    """A subclass of the patch embedding ``cls`` whose forward also records the grid: same
    parameters and keys, an FX leaf (a traced model records it too)."""

    def forward(self, x, *args, **kwargs):
        self.dge_grid.record(tuple(self.dynamic_feat_size((x.shape[-2], x.shape[-1]))))
        return cls.forward(self, x, *args, **kwargs)

    recording = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__, "dge_base": cls})
    register_notrace_module(recording)
    return recording


def record_grid(embed: nn.Module, grid: TokenGrid) -> None:
    """From now on ``embed`` (timm's ``PatchEmbed``: ``dynamic_feat_size``) writes its output
    grid to ``grid`` on every forward."""
    embed.__class__ = _grid_recording(type(embed))
    embed.dge_grid = grid


def stop_recording(embed: nn.Module) -> None:
    """Undoes ``record_grid``."""
    embed.__class__ = embed.dge_base
    del embed.dge_grid
