"""fvcore's FLOP count (detectron2's ``FlopCountAnalysis``) for every op of dge models.

Counting convention (fvcore / detectron2): one fused multiply-add is one flop; additions,
activations, softmax and other elementwise ops are 0. On top of fvcore's handles (linear,
conv, matmul, bmm, einsum, norms, upsampling) this counts:

* ``aten::scaled_dot_product_attention`` (fused attention): q·kᵀ and attn·v, i.e.
  ``B·heads·M·Nk·(d + d_v)`` for queries [B, heads, M, d], keys [.., Nk, d], values [.., Nk, d_v];
* ``aten::grid_sampler`` (deformable sampling): one multiply-add per tap and sampled value,
  ``N·C·out_points·taps`` with 4 taps for bilinear, 8 trilinear, 16 bicubic, 1 nearest;
* ``torchvision::roi_align``: 4 taps per bilinear sample, ``sampling_ratio²`` samples per
  output bin; with adaptive sampling (ratio ≤ 0, detectron2's default) the number depends on
  the boxes, which a trace does not record: one sample per bin is counted (a lower bound);
* the DGE gather / scatter / pooling ops (``index_select``, ``index_copy_``, ``gather``,
  ``scatter*``, ``avg_pool2d``, ``cumsum``, ...) as data movement: 0 flops, but listed;
* elementwise ops, reductions and NMS: 0 by the convention, listed as such.

Any other op is *unsupported*: it is named in the report (and counted 0), never dropped
silently. Scripted functions (``prim::CallFunction``) are named after the function.

DGE routing is data dependent, and fvcore traces one concrete input: each image is traced
on its own (batch 1), so the trace records that image's query counts. The routing maps are
traced as extra outputs, so the router is never dropped as dead code when its decision
only steers Python control flow (e.g. the all-φ=1 fast path). The static count is the same
model with every DGE block forced to φ = 1 (``force_granularity``), which runs exactly the
vanilla blocks, without router.
"""
from collections import Counter
from typing import Any, Callable, Dict, List

import fvcore.nn
import numpy as np
from detectron2.utils import analysis as detectron2_analysis  # activation / parameter counts too
from fvcore.nn.jit_handles import get_shape
from torch import nn

from ..layers import record_routing

__all__ = [
    "CATEGORIES",
    "DATA_MOVEMENT_OPS",
    "ELEMENTWISE_OPS",
    "FlopCountAnalysis",
    "detectron2_analysis",
    "grid_sampler_flop_jit",
    "roi_align_flop_jit",
    "sdpa_flop_jit",
]


# ---------------------------------------------------------------------------- handles


def _numel(value) -> int:
    return int(np.prod(get_shape(value)))


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention(q [.., M, d], k [.., Nk, d], v [.., Nk, d_v])``:
    q·kᵀ (``M·Nk·d``) plus attn·v (``M·Nk·d_v``) per batch × head. Masks, dropout, scaling
    and the softmax are elementwise (0)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = int(np.prod(q[:-2]))
    m, d = q[-2], q[-1]
    nk, dv = k[-2], v[-1]
    return batch * m * nk * (d + dv)


def grid_sampler_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::grid_sampler(input [N, C, H, W], grid [N, Ho, Wo, 2], mode, ...)``: one
    multiply-add per tap per sampled value, ``N·C·Ho·Wo·taps``: bilinear 4 (8 trilinear
    for 5-D input), bicubic 16, nearest 1 (a copy, counted 1 as fvcore's nearest upsample)."""
    mode = inputs[2].toIValue()  # 0 bilinear / trilinear, 1 nearest, 2 bicubic
    spatial_dims = len(get_shape(inputs[0])) - 2
    taps = {0: 2**spatial_dims, 1: 1, 2: 16}[mode]
    return _numel(outputs[0]) * taps


def roi_align_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``torchvision::roi_align(input, rois, scale, ph, pw, sampling_ratio, aligned)`` ->
    [K, C, ph, pw]: 4 taps per bilinear sample, ``sampling_ratio²`` samples per bin; an
    adaptive ratio (≤ 0) depends on the box sizes, which the trace does not keep: 1 sample."""
    ratio = inputs[5].toIValue()
    samples = ratio * ratio if isinstance(ratio, int) and ratio > 0 else 1
    return _numel(outputs[0]) * samples * 4


_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::grid_sampler": grid_sampler_flop_jit,
    "torchvision::roi_align": roi_align_flop_jit,
}

# Ops that move, select, pool or index data: 0 flops, listed. The DGE layer's gather /
# scatter (grained pooling, packing, un-pooling) is all of this kind.
DATA_MOVEMENT_OPS = frozenset(
    "aten::" + op
    for op in (
        "avg_pool2d adaptive_max_pool2d max_pool2d bincount cumsum flip gather index index_add "
        "index_add_ index_copy index_copy_ index_fill_ index_put index_put_ index_select isin "
        "masked_fill masked_fill_ masked_scatter masked_select nonzero nonzero_numpy numel pad "
        "repeat repeat_interleave roll scatter scatter_ scatter_add scatter_add_ scatter_reduce searchsorted "
        "scatter_reduce_ take take_along_dim topk sort argsort unique_dim _unique2 where"
    ).split()
)

# Elementwise ops and reductions: 0 flops by fvcore's / detectron2's convention, listed.
# (detectron2's own ignore list, e.g. torchvision::nms, is listed with them.)
ELEMENTWISE_OPS = frozenset(
    ["aten::" + op for op in (
        "abs add add_ addcmul all amax amin aminmax any argmax argmin ceil clamp_min clamp_max "
        "cos div div_ erf exp exp_ fill_ gelu hardtanh le log log_softmax lt maximum mean min "
        "minimum mul mul_ ne neg pow reciprocal rsqrt rsub sigmoid sigmoid_ silu sin softmax "
        "sqrt square sub sub_ sum tanh"
    ).split()]
    + sorted(detectron2_analysis._IGNORED_OPS)
) - DATA_MOVEMENT_OPS

# Scripted functions detectron2 / torchvision call (prim::CallFunction, opaque to the trace)
# that only do box arithmetic or NMS: 0 by the convention. Any other scripted call is
# unsupported.
_ZERO_SCRIPTED = (
    "Box2BoxTransform.apply_deltas",
    "Box2BoxTransform.get_deltas",
    "_batched_nms_coordinate_trick",
    "_batched_nms_vanilla",
)

CATEGORIES = ("data movement", "elementwise")

# ---------------------------------------------------------------------------- analysis


class FlopCountAnalysis(detectron2_analysis.FlopCountAnalysis):
    """detectron2's (and so fvcore's) ``FlopCountAnalysis`` counting every op of dge models.

    Args:
        model: any module: a detectron2 model (``inputs`` a ``list[dict]`` of one image), a
            backbone, or a single DGE block (``inputs`` a tuple of its arguments, e.g.
            ``(x, hw, granularity_map)``; non-tensor arguments are constants of the trace).
        inputs: the model's arguments, as for detectron2's ``FlopCountAnalysis``.

    Module names are those of detectron2's tracing wrapper: the model is ``"model"``, its
    children ``"model.backbone"`` etc. (``traced_name``). Besides fvcore's methods:
    ``zero_flop_ops()`` lists the ops counted 0 by category, and ``unsupported_ops()`` also
    names unknown scripted calls. One trace is one input: use batch 1 to follow one image's
    routing (``analyze_image``).
    """

    @staticmethod
    def traced_name(name: str) -> str:
        """The name fvcore reports for the model's submodule ``name`` ("" is the model)."""
        return "model." + name if name else "model"

    def __init__(self, model: nn.Module, inputs: Any):
        def inference(module, *args):
            # Every DGE block's routing map becomes an output: it keeps the router live.
            with record_routing() as record:
                out = module(*args)
            return out, [info.granularity_map for info in record.infos]

        wrapper = detectron2_analysis.TracingAdapter(model, inputs, inference_func=inference, allow_non_tensor=True)
        # detectron2's __init__ builds the same adapter without the routing outputs.
        fvcore.nn.FlopCountAnalysis.__init__(self, wrapper, wrapper.flattened_inputs)
        self._zero_ops: Dict[str, Counter] = {c: Counter() for c in CATEGORIES}
        self._opaque_calls: Counter = Counter()
        self.set_op_handle(**_EXTRA_HANDLES)
        for op in DATA_MOVEMENT_OPS:
            self.set_op_handle(op, self._zero_handle("data movement", op))
        for op in ELEMENTWISE_OPS:
            self.set_op_handle(op, self._zero_handle("elementwise", op))
        self.set_op_handle("prim::CallFunction", self._scripted_call)

    def _zero_handle(self, category: str, op: str) -> Callable:
        def handle(inputs, outputs) -> int:
            self._zero_ops[category][op] += 1
            return 0

        return handle

    def _scripted_call(self, inputs, outputs) -> int:
        name = str(inputs[0].type()).replace("__torch__.", "")
        if name.endswith(_ZERO_SCRIPTED):
            self._zero_ops["elementwise"][f"prim::CallFunction[{name}]"] += 1
        else:
            self._opaque_calls[f"prim::CallFunction[{name}]"] += 1
        return 0

    def _analyze(self):
        if self._stats is None:
            for c in self._zero_ops.values():
                c.clear()
            self._opaque_calls.clear()
        return super()._analyze()

    def zero_flop_ops(self) -> Dict[str, Counter]:
        """{"data movement": Counter(op -> occurrences), "elementwise": ...}: ops counted 0."""
        self._analyze()
        return {c: Counter(v) for c, v in self._zero_ops.items()}

    def unsupported_ops(self, module_name: str = "") -> Counter:
        """fvcore's unsupported ops of ``module_name``; for the whole model also the scripted
        calls whose content the trace cannot see."""
        self._analyze()
        ops = Counter(super().unsupported_ops(module_name))
        if module_name in ("", "model"):
            ops.update(self._opaque_calls)
        return ops
