"""Stand-in for ``detectron2._C`` in a detectron2 built without its C++ sources.

Installed as ``detectron2/_C.py`` by ``tools/setup/build_detectron2.py`` when detectron2
comes from the ``pb1-detectron2==0.6`` sdist, which ships no C++ sources. It makes every
detectron2 module importable (several import ``_C`` at module level) and makes every
compiled op fail, when it is called, with a message that names the op and says how to
get it. Mask R-CNN and Semantic FPN need none of these ops (RoIAlign and NMS come from
torchvision).
"""

import torch

# Read by dge.detectron2.compat.has_compiled_ops().
IS_STANDIN = True

_HOW_TO_GET = (
    "This detectron2 was installed from the pb1-detectron2 sdist without its C++/CUDA "
    "extension (detectron2._C). Build detectron2 from source to get it: "
    "`pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'` "
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
)


class MissingCompiledOpError(RuntimeError):
    """A detectron2 op that exists only in the compiled extension was called."""


def get_compiler_version() -> str:
    return "none (detectron2._C not compiled)"


def get_cuda_version() -> str:
    return "none (detectron2._C not compiled)"


def has_cuda() -> bool:
    return False


def _missing_op(name: str):
    def op(*args, **kwargs):
        raise MissingCompiledOpError(
            f"detectron2 op '{name}' needs detectron2's compiled extension, which is missing. "
            + _HOW_TO_GET
        )

    op.__name__ = name
    op.__qualname__ = name
    return op


def __getattr__(name: str):
    # Module attributes Python itself looks up must stay AttributeErrors.
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    return _missing_op(name)


# Ops detectron2 calls through the torch dispatcher (``torch.ops.detectron2.<name>``) rather
# than through this module: registered here so that they fail with the same clear message.
_DISPATCHER_OPS = {
    "nms_rotated": "nms_rotated(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = torch.library.Library("detectron2", "DEF")
for _name, _schema in _DISPATCHER_OPS.items():
    _LIBRARY.define(_schema)
    _LIBRARY.impl(_name, _missing_op(_name), "CompositeImplicitAutograd")
