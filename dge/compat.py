"""Everything that differs between detectron2 v0.6 (pb1-detectron2, no compiled ops) and
current detectron2 built from source goes through this module, nowhere else."""
import functools

import detectron2

__all__ = ["DETECTRON2_VERSION", "has_compiled_ops", "detectron2_description"]

# (major, minor) of the installed detectron2, e.g. (0, 6).
DETECTRON2_VERSION = tuple(int(v) for v in detectron2.__version__.split(".")[:2])


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """True if detectron2's C++/CUDA extension is built (False for the pb1-detectron2 build,
    whose ``detectron2._C`` is the stand-in from tools/setup/detectron2_C_standin.py)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_STANDIN", False)


def detectron2_description() -> str:
    ops = "compiled ops" if has_compiled_ops() else "no compiled ops"
    return f"detectron2 {detectron2.__version__} ({ops})"
