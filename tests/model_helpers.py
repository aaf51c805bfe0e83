"""Helpers of the model tests: timm DGE models with routers that route by content; a call
and its routing."""
import timm
import torch

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
