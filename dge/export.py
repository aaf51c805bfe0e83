"""Export of dge models as graphs that keep their dynamic routing.

A DGE block's inference is a tensor program (``dge.layers.grained``): how many queries an
image keeps in a block is a dynamic size of the graph (the shape of one ``nonzero``), so an
exported model routes every input anew. Three formats:

* ``exported``: ``torch.export`` (a ``.pt2`` file, ``torch.export.load``);
* ``onnx``: ``torch.onnx.export(..., dynamo=True)`` of the exported program, run by
  onnxruntime;
* ``torchscript``: ``torch.jit.trace``; whole detectron2 models go through detectron2's
  ``TracingAdapter``, as its ``tools/deploy/export_model.py --export-method tracing``
  (``dge.detectron2.export``).

An export is made at batch 1 for one input size (position embeddings and DGE layouts are
computed for it): ``ExportedModel`` checks the size of what it is given. Each file has its
metadata beside it (``<file>.json``: format, kind, input shape, output names).
"""
import contextlib
import json
import os
import pickle
import traceback
import warnings
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .layers import record_routing, routing_stats

__all__ = [
    "FORMATS",
    "FILE_SUFFIXES",
    "ExportError",
    "ExportedModel",
    "RoutedOutputs",
    "SCHEMA_FILE",
    "export_module",
    "flat_tensors",
    "binary_differences",
    "max_difference",
    "onnxruntime_session",
    "openvino_model",
]

FORMATS = ("exported", "onnx", "torchscript")
FILE_SUFFIXES = {"exported": ".pt2", "onnx": ".onnx", "torchscript": ".ts"}
SCHEMA_FILE = "outputs_schema.pkl"  # a torchscript file's output schema (rebuilds a structured output)


class ExportError(RuntimeError):
    """An export that stopped: names the module and the op (source line) where it did."""


class RoutedOutputs(nn.Module):
    """``model(x)`` as a flat dict of tensors, with each image's β and routing statistics of
    the DGE blocks (``dge.layers.routing_stats``) as ``dge.beta``, ``dge.beta_stage1``, ...:
    outputs that export, tracing and activation counting all take.

    Args:
        model: a module of one tensor (a timm model, a detectron2 backbone) returning a
            tensor or a dict of tensors.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        with record_routing() as record:
            out = self.model(x)
        flat = OrderedDict(out) if isinstance(out, Mapping) else OrderedDict(output=out)
        for k, v in (routing_stats(self.model, record) or {}).items():
            flat[f"dge.{k}"] = v
        return flat


@contextlib.contextmanager
def where_it_stops(model: nn.Module, fmt: str) -> Iterator[None]:
    """Turns an exception of an export into an ``ExportError`` naming the innermost module
    that was running and the last source line of dge or of the model's own code."""
    stack: List[str] = []  # names of the modules running, innermost last
    names = {m: n or "(model)" for n, m in model.named_modules()}

    def pre(m, *_):
        stack.append(f"{names[m]!r} ({type(m).__name__})")

    def post(m, *_):  # returns None: the output stays
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]
    try:
        yield
    except ExportError:
        raise
    except Exception as exc:
        module = stack[-1] if stack else f"'(model)' ({type(model).__name__})"
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
        where = f" at {frames[-1].filename}:{frames[-1].lineno} `{(frames[-1].line or '').strip()}`" if frames else ""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{fmt} export stopped in module {module}{where}: {type(exc).__name__}: {message}"
        ) from exc
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def quiet_tracer() -> Iterator[None]:
    """``torch.jit.trace`` warns about every Python number it keeps as a constant; here those
    are sizes fixed by the export's input size (layouts, position embeddings), not routing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def write_metadata(path: str, meta: Dict[str, Any]) -> None:
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)


def export_module(module: nn.Module, example: torch.Tensor, path: str, fmt: str, **meta) -> Dict[str, Any]:
    """Exports ``module`` (a module of one tensor returning a dict of tensors, e.g.
    ``RoutedOutputs``) traced on ``example`` [1, C, H, W] to ``path`` in format ``fmt``;
    writes ``path + ".json"`` (with ``meta`` added) and returns that metadata.

    Raises:
        ExportError: the module and op where the export stopped.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {fmt!r}")
    if example.dim() != 4 or example.shape[0] != 1:
        raise ValueError(f"exports are made at batch 1 from one [1, C, H, W] input; got {list(example.shape)}")
    module = module.eval()
    with torch.no_grad():
        names = list(module(example).keys())
    with where_it_stops(module, fmt):
        if fmt == "exported":
            program = torch.export.export(module, (example,))
            torch.export.save(program, path)
        elif fmt == "onnx":
            from .onnx_ops import onnx_translations

            torch.onnx.export(
                module, (example,), path, dynamo=True, input_names=["image"], output_names=names, verbose=False,
                custom_translation_table=onnx_translations(),  # attention as ONNX Runtime's fused op
            )
        else:
            with torch.no_grad(), quiet_tracer():
                traced = torch.jit.trace(module, (example,), strict=False, check_trace=False)
            torch.jit.save(traced, path)
    metadata = dict(format=fmt, kind="module", input_shape=list(example.shape), outputs=names, **meta)
    write_metadata(path, metadata)
    return metadata


def onnxruntime_session(path: str, threads: Optional[int] = None, profile_prefix: Optional[str] = None):
    """An onnxruntime CPU session of ``path``, set as ONNX Runtime's performance guide advises
    for latency on a CPU: every graph optimisation (``ORT_ENABLE_ALL``: fusions such as
    LayerNorm, GELU with its bias, MatMul with scale), sequential execution with one inter-op
    thread and ``threads`` intra-op threads (default torch's: one per physical core), the CPU
    memory arena on (off, a DGE model's dynamic sizes allocate anew each run: 1.8× slower
    measured). ``profile_prefix``: ONNX Runtime's profiler on, its trace written there."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - requirements.txt installs it
        raise ImportError("running ONNX files needs onnxruntime: pip install onnxruntime") from exc
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def openvino_model(path: str, threads: Optional[int] = None, profile: bool = False):
    """An ONNX file compiled by OpenVINO for the CPU: latency hint, ``threads`` inference
    threads (default torch's), float32 (OpenVINO would otherwise run bfloat16 where the CPU
    has it); ``profile``: per-node times (``profiling_info`` of an infer request)."""
    try:
        import openvino
    except ImportError as exc:
        raise ImportError("running ONNX files in OpenVINO needs openvino: pip install openvino") from exc
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
              "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": profile}
    return openvino.Core().compile_model(path, "CPU", config)


class ExportedModel:
    """A file written by ``export_module`` / ``dge.detectron2.export_detectron2_model``, ready to run.

    ``model(x)`` takes what the export was made from (``[1, C, H, W]`` for a module, a
    ``[C, H, W]`` image for a detectron2 model) and returns the same structure as the eager
    model: a dict of tensors, or detectron2's list of output dicts. An input of another
    shape than the export's is refused with a message that says which it takes. ONNX files
    run in ``runtime`` "onnxruntime" (``onnxruntime_session``) or "openvino" (``openvino_model``).
    """

    def __init__(self, path: str, threads: Optional[int] = None, runtime: str = "onnxruntime"):
        meta_path = path + ".json"
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path} is missing: export with dge.export (tools/export_model.py)")
        with open(meta_path) as f:
            self.metadata = json.load(f)
        if self.metadata.get("postprocess"):  # its schema is detectron2's own, without the paste step
            raise ValueError(f"{path} was exported by an older dge: export it again (tools/export_model.py)")
        self.path = path
        self.format = self.metadata["format"]
        self.input_shape = tuple(self.metadata["input_shape"])
        self._schema = None
        if self.format == "exported":
            self._run = torch.export.load(path).module()
        elif self.format == "onnx" and runtime == "openvino":
            compiled = openvino_model(path, threads)
            self._run = lambda x: [torch.from_numpy(v) for v in compiled(x.numpy()).values()]
        elif self.format == "onnx":
            session = onnxruntime_session(path, threads)
            input_name = session.get_inputs()[0].name
            self._run = lambda x: [torch.from_numpy(v) for v in session.run(None, {input_name: x.numpy()})]
        else:
            extra = {SCHEMA_FILE: ""}
            self._run = torch.jit.load(path, _extra_files=extra)
            if extra[SCHEMA_FILE]:
                self._schema = pickle.loads(extra[SCHEMA_FILE])

    def __call__(self, x: torch.Tensor):
        if tuple(x.shape) != self.input_shape:
            raise ValueError(
                f"{os.path.basename(self.path)} was exported for inputs of shape {list(self.input_shape)} "
                f"(exports are made for one size); got {list(x.shape)}: resize the input or export again "
                f"at this size (tools/export_model.py --input-size)"
            )
        with torch.no_grad():
            out = self._run(x)
        if self._schema is not None:  # e.g. dge.detectron2.export.Detectron2Outputs
            return self._schema(out if isinstance(out, (tuple, list)) else (out,), x)
        if isinstance(out, Mapping):
            return OrderedDict(out)
        return OrderedDict(zip(self.metadata["outputs"], out))


def flat_tensors(outputs) -> List[torch.Tensor]:
    """Every tensor of a model's outputs, in order: dicts (by key), lists, tuples, and objects
    with fields (detectron2's ``Instances``: ``get_fields()``) or a ``tensor`` (``Boxes``)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):
        return [t for k in sorted(outputs) for t in flat_tensors(outputs[k])]
    if isinstance(outputs, (list, tuple)):
        return [t for o in outputs for t in flat_tensors(o)]
    if hasattr(outputs, "get_fields"):
        return flat_tensors(outputs.get_fields())
    tensor = getattr(outputs, "tensor", None)
    return [tensor] if isinstance(tensor, torch.Tensor) else []


def max_difference(a, b) -> float:
    """Largest absolute difference between the numeric tensors of two outputs of the same
    structure (binary ones, e.g. pasted masks, are compared by ``binary_differences``); inf
    when their tensors differ in number or shape (e.g. another count of detections)."""
    ta, tb = flat_tensors(a), flat_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    pairs = [(x, y) for x, y in zip(ta, tb) if x.numel() and x.dtype != torch.bool]
    return max((float((x.double() - y.double()).abs().max()) for x, y in pairs), default=0.0)


def binary_differences(a, b) -> Tuple[int, int]:
    """(elements that differ, elements) over the boolean tensors of two outputs of the same
    structure: a pasted mask pixel flips when its probability lies within rounding of 0.5."""
    pairs = [(x, y) for x, y in zip(flat_tensors(a), flat_tensors(b)) if x.dtype == torch.bool and x.shape == y.shape]
    return sum(int((x != y).sum()) for x, y in pairs), sum(x.numel() for x, _ in pairs)

