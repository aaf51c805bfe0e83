"""Export of whole detectron2 models (e.g. ``DGERCNN``), as detectron2's deploy tool does it
(``tools/deploy/export_model.py --export-method tracing``): through its ``TracingAdapter``,
with the output schema stored in the file so that ``dge.export.ExportedModel`` gives back
detectron2's list of output dicts (``Detectron2Outputs``)."""
import pickle

import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from torch import nn

from dge.export import FORMATS, SCHEMA_FILE, quiet_tracer, where_it_stops, write_metadata
from dge.layers import record_routing, routing_stats

from .meta_arch import BudgetLossMixin

__all__ = ["Detectron2Outputs", "check_detectron2_format", "export_detectron2_model"]


class Detectron2Outputs:
    """The outputs of a traced detectron2 model rebuilt from its flat tensors (detectron2's
    ``outputs_schema``); for an R-CNN, its RoI masks pasted into the image afterwards
    (``detector_postprocess``), as detectron2's deploy tool: the graph ends before it."""

    def __init__(self, schema, postprocess: bool):
        self.schema = schema
        self.postprocess = postprocess

    def __call__(self, flat, image: torch.Tensor):
        outputs = self.schema(flat)
        if self.postprocess:
            for o in outputs:
                o["instances"] = detector_postprocess(o["instances"], image.shape[-2], image.shape[-1])
        return outputs


def check_detectron2_format(fmt: str) -> None:
    """Whole detectron2 models export through tracing only: under torch.export (and ONNX,
    which goes through it) detectron2's ``ImageList`` pads to a size read from the image
    sizes, a data-dependent value every backbone then branches on."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}; got {fmt!r}")
    if fmt != "torchscript":
        raise ValueError(
            f"a whole detectron2 model is not exported as {fmt!r} (detectron2 pads its input to a size "
            "read from the data, which torch.export cannot take): use --format torchscript, or export the "
            "backbone (--what backbone) or a timm model as exported / onnx"
        )


def _rcnn_inference(model, inputs):
    """An R-CNN's inference up to its RoI masks, with the routing statistics of a DGE model."""
    with record_routing() as record:
        outputs = [{"instances": i} for i in model.inference(inputs, do_postprocess=False)]
    if not isinstance(model, BudgetLossMixin):
        return outputs
    return model.attach_routing_stats(outputs, routing_stats(model.backbone, record))


def export_detectron2_model(model: nn.Module, image: torch.Tensor, path: str, fmt: str = "torchscript", **meta):
    """Exports a whole detectron2 model (e.g. ``DGERCNN``) traced on ``image`` [C, H, W] (the
    tensor its ``forward([{"image": image}])`` takes) through detectron2's
    ``TracingAdapter``. The output schema (instances, the ``"dge"`` dict) is stored with the
    file. Returns the metadata.

    Raises:
        dge.export.ExportError: the module and op where the export stopped.
    """
    check_detectron2_format(fmt)
    if image.dim() != 3:
        raise ValueError(f"a detectron2 model is exported from one [C, H, W] image; got {list(image.shape)}")
    model = model.eval()
    rcnn = isinstance(model, GeneralizedRCNN)
    adapter = TracingAdapter(model, [{"image": image}], inference_func=_rcnn_inference if rcnn else None)
    with where_it_stops(model, fmt):
        with torch.no_grad(), quiet_tracer():
            traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
    schema = pickle.dumps(Detectron2Outputs(adapter.outputs_schema, postprocess=rcnn))
    torch.jit.save(traced, path, _extra_files={SCHEMA_FILE: schema})
    metadata = dict(format=fmt, kind="detectron2", input_shape=list(image.shape), **meta)
    write_metadata(path, metadata)
    return metadata
