"""How dge's ONNX exports write the two ops ONNX Runtime runs slowly in torch's default form.

* Attention as ONNX Runtime's fused ``com.microsoft.MultiHeadAttention`` (logits, softmax and
  the value product in one kernel) instead of the MatMul, Softmax, MatMul chain, which
  materialises every logit. It runs on the CPU for queries of any count and an additive 4-D
  bias (relative positions, window masks). Opset 23's standard ``Attention`` op is not used:
  ONNX Runtime 1.32's CPU kernel for it was slower than the chain on PVT-S.
* DGE's patch means (``avg_pool2d`` over k×k patches, stride k) as two ReduceSums on the
  channels-last map instead of AveragePool, which ONNX Runtime runs in NCHW between two
  Transposes.

Used by ``dge.export.export_module`` through ``torch.onnx.export(custom_translation_table=...)``;
needs onnxscript (the ``export`` extra). Measured in projects/DGE/README.md ([B11]).
"""
import math
from typing import Callable, Dict, Tuple

__all__ = ["FUSED_ATTENTION", "onnx_translations"]

FUSED_ATTENTION = ("com.microsoft", "MultiHeadAttention")  # (domain, op type) of the fused attention


def _schema():
    """The part of ``com.microsoft.MultiHeadAttention``'s schema dge writes (onnx has none of
    ONNX Runtime's contrib ops): query [B, M, heads·d], key and value [B, L, heads·d], an
    optional additive bias [B or 1, heads or 1, M, L]; attributes num_heads and scale."""
    from onnx.defs import OpSchema

    optional = OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, "T") for name in ("query", "key", "value")]
    inputs += [OpSchema.FormalParameter(name, "T", param_option=optional)
               for name in ("bias", "key_padding_mask", "attention_bias")]
    return OpSchema(
        FUSED_ATTENTION[1], FUSED_ATTENTION[0], 1, inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads", required=True),
                    OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "logit scale", required=False)],
    )


def onnx_translations() -> Dict[Callable, Callable]:
    """{aten op: onnxscript function} for ``torch.onnx.export``'s custom translation table."""
    import onnxscript
    import torch
    from onnxscript import opset18 as op

    fused = onnxscript.values.Op(onnxscript.values.Opset(FUSED_ATTENTION[0], 1), FUSED_ATTENTION[1], _schema())

    def attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale=None, enable_gqa: bool = False):
        """aten.scaled_dot_product_attention of [B, heads, M, d] queries at inference."""
        if dropout_p != 0.0 or is_causal or enable_gqa or len(query.shape) != 4:
            raise ValueError("dge's ONNX export writes attention without dropout, causal masks or grouped "
                             "heads (an inference model in eval mode)")
        heads, head_dim = query.shape[1], query.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise ValueError("attention heads and head size must be static in an ONNX export")
        bias = None
        if attn_mask is not None:
            if len(attn_mask.shape) != 4:
                raise ValueError(f"an attention bias of rank {len(attn_mask.shape)}: dge's blocks give rank 4")
            bias = attn_mask
            if attn_mask.dtype == onnxscript.ir.DataType.BOOL:
                zero, low = op.CastLike(0.0, query), op.CastLike(-math.inf, query)
                bias = op.Where(attn_mask, zero, low)
        def tokens(t):  # [B, heads, n, d] -> [B, n, heads·d]: the fused op's layout (4-D keys: 1.8× slower)
            return op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, -1, heads * head_dim]))

        out = fused(tokens(query), tokens(key), tokens(value), None, None, bias, num_heads=heads,
                                      scale=float(scale) if scale is not None else head_dim ** -0.5)
        return op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, -1, heads, head_dim])), perm=[0, 2, 1, 3])

    return {torch.ops.aten.scaled_dot_product_attention.default: attention,
            torch.ops.aten.avg_pool2d.default: _patch_means(op)}


def _pair(value) -> Tuple[int, int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return (values[0], values[-1]) if values else (0, 0)


def _patch_means(op) -> Callable:
    """aten.avg_pool2d: a pooling of k×k patches (stride k, no padding: DGE's patch means,
    ``ceil_mode``: border patches average their valid tokens) as two ReduceSums on the
    channels-last map and a constant of the inverse valid counts; other poolings as ONNX's
    AveragePool. ONNX Runtime runs AveragePool in NCHW, between two Transposes, 3-10× slower
    than the sums (measured on DGE's maps); the Transposes around the sums cancel with the
    block's own."""
    import numpy as np
    from onnxscript import ir

    def avg_pool2d(x, kernel_size, stride=(), padding=(0, 0), ceil_mode: bool = False,
                   count_include_pad: bool = True, divisor_override=None):
        k, step, pad = _pair(kernel_size), _pair(stride) if stride else _pair(kernel_size), _pair(padding)
        if divisor_override is not None:
            raise ValueError("avg_pool2d with divisor_override has no ONNX form in dge's exports")
        shape = list(x.shape)
        static = len(shape) == 4 and all(isinstance(d, int) for d in shape[1:])
        cut = static and not ceil_mode and (shape[2] % k[0] or shape[3] % k[1])  # floor mode drops a border
        if not static or k != step or k[0] != k[1] or pad != (0, 0) or cut:
            return op.AveragePool(x, kernel_shape=list(k), strides=list(step), pads=[pad[0], pad[1]] * 2,
                                  ceil_mode=int(ceil_mode), count_include_pad=int(count_include_pad))
        (c, h, w), k = shape[1:], k[0]
        ho, wo = -(-h // k), -(-w // k)
        rows = np.minimum(k, h - np.arange(ho) * k)
        cols = np.minimum(k, w - np.arange(wo) * k)
        inverse = (1.0 / np.outer(rows, cols)).astype(np.float32).reshape(1, ho, wo, 1)
        y = op.Transpose(x, perm=[0, 2, 3, 1])
        if ho * k > h or wo * k > w:
            y = op.Pad(y, op.Constant(value_ints=[0, 0, 0, 0, 0, ho * k - h, wo * k - w, 0]))
        y = op.ReduceSum(op.Reshape(y, op.Constant(value_ints=[-1, k, wo * k * c])), op.Constant(value_ints=[1]),
                         keepdims=0)  # the k rows of each band of patches
        y = op.ReduceSum(op.Reshape(y, op.Constant(value_ints=[-1, k, c])), op.Constant(value_ints=[1]), keepdims=0)
        y = op.Mul(op.Reshape(y, op.Constant(value_ints=[-1, ho, wo, c])),
                   op.CastLike(op.Constant(value=ir.tensor(inverse)), x))
        return op.Transpose(y, perm=[0, 3, 1, 2])

    return avg_pool2d
