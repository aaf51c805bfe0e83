"""Helpers of the model tests: timm DGE models with routers that route by content."""
import timm
import torch

import dge  # noqa: F401  (registers the timm models)
from dge.analysis.calibration import calibrate, randomize_routers


def routed_model(name: str, x: torch.Tensor, target: float = 0.5):
    """``name`` with content routers calibrated to β ≈ ``target`` on ``x`` (eval mode)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    randomize_routers(model, seed=0)
    with torch.no_grad():
        calibrate(model, lambda: model(x), target, steps=10)
    return model
