"""Helpers of the model tests: timm DGE models with routers that route by content; a call
and its routing."""
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dge  # noqa: F401  (registers the timm models)
from dge.analysis.calibration import calibrate, randomize_routers
from dge.layers import record_routing


def routed_model(name: str, x: torch.Tensor, target: float = 0.5):
    """``name`` with content routers calibrated to β ≈ ``target`` on ``x`` (eval mode)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    randomize_routers(model, seed=0)
    with torch.no_grad():
        calibrate(model, lambda: model(x), target, steps=10)
    return model


def recorded(module: torch.nn.Module, *args, **kwargs):
    """(``module(*args, **kwargs)``, the ``RoutingRecord`` of that call)."""
    with record_routing() as record:
        out = module(*args, **kwargs)
    return out, record


def fx_extractor(model):
    """timm's ``_create_fx_model``: a symbolic trace with timm's leaf modules and functions."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    train, evaluation = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(
        model, train_return_nodes=[train[-1]], eval_return_nodes=[evaluation[-1]], tracer_kwargs=tracer_kwargs
    )
