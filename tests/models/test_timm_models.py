"""timm's model contract (its tests/test_models.py, for the non-standard transformer
models) for every name this project registers, at a small input: forward, backward with
every parameter receiving a gradient, default cfg, features_only, forward_intermediates
and FX tracing (blocks are FX leaves)."""
import math

import pytest
import timm
import torch
from timm.models import FeatureInfo

import dge  # noqa: F401  (registration)
from model_helpers import fx_extractor

OUR_MODULES = ("dge.models.pvt", "dge.models.deit")
NAMES = sorted(
    n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__ in OUR_MODULES
)
SIZE = 32  # the smallest input of every model (PVT's total stride); DeiT runs from 16


def _input(batch=1, size=SIZE):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_every_registered_name_is_covered():
    assert len(NAMES) == 18, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_forward_and_default_cfg(name):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state and cfg["classifier"] + ".weight" in state
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size > 0
    x = _input()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.ndim == 3 and features.shape[-1] == model.num_features
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (1, model.head_hidden_size)
        logits = model(x)
        assert logits.shape == (1, 1000) and not torch.isnan(logits).any()
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre.shape
        assert timm.create_model(name, num_classes=0).eval()(x).shape == (1, model.num_features)


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_input(batch=2))
    assert out.shape == (2, 42)
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("name", NAMES)
def test_features_only_and_forward_intermediates(name):
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    x = _input()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        extractor = timm.create_model(name, features_only=True).eval()
        outs = extractor(x)
    assert len(maps) == len(info.channels())
    for c, r, m in zip(info.channels(), info.reduction(), maps):
        assert m.shape[:2] == (1, c) and m.shape[2] <= math.ceil(SIZE / r) + 1 and not torch.isnan(m).any()
    for c, o in zip(extractor.feature_info.channels(), outs):
        assert o.shape[1] == c


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_forward_and_backward(name):
    model = timm.create_model(name).eval()
    x = _input()
    with torch.inference_mode():
        eager = model(x)
        traced = torch.cat(tuple(fx_extractor(model)(x).values()))
    assert torch.equal(traced, eager)
    model = timm.create_model(name, num_classes=42).train()
    out = torch.cat(tuple(fx_extractor(model)(_input(batch=2)).values()))
    out.mean().backward()
    assert out.shape[-1] == 42 and all(p.grad is not None for p in model.parameters())
