"""Helpers of the model tests: timm DGE models with routers that route by content; a call
and its routing."""
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import dge  # (also registers the timm models)
from dge.layers.calibration import calibrate, randomize_routers
from dge.layers import dge_modules, record_routing


@dataclass(frozen=True)
class TimmCase:
    """A small timm model: ``timm.create_model(name, **kwargs)``, its input size, and the
    ``dge.patch`` options it takes (None: the defaults)."""

    name: str
    kwargs: Dict = field(default_factory=dict)
    hw: Tuple[int, int] = (64, 96)
    options: Any = None

    def build(self, seed: int = 0):
        """(the model in eval mode, x [2, 3, H, W]); norms, layer scales and relative positions
        drawn at random so that every block changes its input (timm's init leaves DeiT III's
        scales at 1e-6, SAM's relative positions at 0)."""
        torch.manual_seed(seed)
        model = timm.create_model(self.name, **self.kwargs).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(("gamma", "gamma_1", "gamma_2", "norm1.weight", "norm2.weight")) or "rel_pos" in n:
                    p.normal_(1.0 if "norm" in n else 0.0, 0.5)
        return model, torch.randn(2, 3, *self.hw, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def encoder_block(kind: str, seed: int = 0, dim: int = 16):
    """dge's EncoderBlock (eval mode) of ``kind``: "pvt" (SR attention, ratio 2), "global" (ratio 1)
    or "deformable" (3 points a head, offsets that depend on the query)."""
    from dge.layers import DeformableAttention, EncoderBlock, SpatialReductionAttention

    torch.manual_seed(seed)
    if kind == "deformable":
        attn = DeformableAttention(dim, num_heads=2, num_points=3, qkv_bias=True)
        torch.nn.init.normal_(attn.offsets.weight, std=0.3)  # let offsets depend on the query
    elif kind in ("pvt", "global"):
        attn = SpatialReductionAttention(dim, num_heads=2, qkv_bias=True, sr_ratio=2 if kind == "pvt" else 1)
    else:
        raise ValueError(kind)
    return EncoderBlock(dim, attn, mlp_ratio=2.0).eval()


def routed_model(name: str, x: torch.Tensor, target: float = 0.5):
    """``name`` with content routers calibrated to β ≈ ``target`` on ``x`` (eval mode)."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    randomize_routers(model, seed=0)
    with torch.no_grad():
        calibrate(model, lambda: model(x), target, steps=10)
    return model


# timm models patched by dge.patch, one per attention dge adds: EVA-02 (rotary table at
# pooled centres), a SAM ViT (windows of 4 padded, a global block, relative positions), Swin
# (shifted windows, masks, bias at half steps), PVT v2 (the conv on the dense map) and SAM 2's
# Hiera (per-block options from fit_to_windows, a dense pooling block).
PATCHED_MODELS = {
    "eva02": (dict(model_name="eva02_tiny_patch14_224", img_size=(84, 112), depth=2), (84, 112)),
    "sam": (dict(model_name="samvit_base_patch16", img_size=(176, 240), window_size=4, depth=3,
                 global_attn_indexes=[1], embed_dim=64, num_heads=2), (176, 240)),
    "swin": (dict(model_name="swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2), num_heads=(1, 2),
                  window_size=8, img_size=(76, 84)), (76, 84)),
    "pvt_v2": (dict(model_name="pvt_v2_b0", depths=(1, 1, 1, 1)), (96, 128)),
    "sam2_hiera": (dict(model_name="sam2_hiera_tiny", embed_dim=32, num_heads=1, stages=(1, 2, 2, 1),
                        global_att_blocks=(4,), window_spec=(8, 4, 4, 2)), (128, 160)),
}


def routed_patched_model(case: str, batch: int, seed: int = 0):
    """(PATCHED_MODELS[case] patched, routers calibrated to β ≈ 0.5 on x; x [batch, 3, H, W])."""
    kwargs, hw = PATCHED_MODELS[case]
    torch.manual_seed(seed)
    options = dge.adapters.fit_to_windows({}) if case == "sam2_hiera" else None
    model = dge.patch(timm.create_model(**kwargs).eval(), options)
    randomize_routers(model, seed=0)
    x = torch.randn(batch, 3, *hw)
    with torch.no_grad():
        calibrate(model, lambda: model(x), 0.5, steps=10)
    return model, x


def granularity_maps(record):
    """Each DGE block call's granularity map [B, Hr, Wr] in ``record``, in call order (copies)."""
    return [info.granularity_map.clone() for info in record.infos]


class forced_routing:
    """Every DGE block of ``model`` takes its map from ``granularity_maps`` (the same routing
    in another dtype; the routers then do not run)."""

    def __init__(self, model, granularity_maps):
        self.pairs = list(zip(dge_modules(model), granularity_maps))

    def __enter__(self):
        def hook(gmap):
            return lambda module, args, kwargs: (args, dict(kwargs, granularity_map=gmap))

        self.hooks = [m.register_forward_pre_hook(hook(g), with_kwargs=True) for m, g in self.pairs]

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


def recorded(module: torch.nn.Module, *args, **kwargs):
    """(``module(*args, **kwargs)``, the ``RoutingRecord`` of that call)."""
    with record_routing() as record:
        out = module(*args, **kwargs)
    return out, record


def fx_extractor(model):
    """timm's ``_create_fx_model``: a symbolic trace with timm's leaf modules and functions. Optional
    inputs (Hiera's ``mask``, ViT's ``attn_mask`` and ``is_causal``) are traced at their defaults, as a
    plain call passes them."""
    tracer_kwargs = dict(
        leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
    )
    params = inspect.signature(model.forward).parameters.values()
    optional = {p.name: p.default for p in params if p.default is not p.empty}
    train, evaluation = get_graph_node_names(model, tracer_kwargs=tracer_kwargs, concrete_args=optional)
    return create_feature_extractor(
        model, train_return_nodes=[train[-1]], eval_return_nodes=[evaluation[-1]], tracer_kwargs=tracer_kwargs,
        concrete_args=optional,
    )


def reference_dge(block, x, hw, gmap, region, num_extra=0):
    """Loop over images, regions and patches: the definition of the DGE output."""
    h, w = hw
    out = x.clone()
    for b in range(x.shape[0]):
        spatial = x[b, num_extra:].view(h, w, -1)
        queries, centers, members = [], [], []
        for ri in range(gmap.shape[1]):
            for rj in range(gmap.shape[2]):
                g = int(gmap[b, ri, rj])
                if g == 0:
                    continue
                for py in range(ri * region, (ri + 1) * region, g):
                    for px in range(rj * region, (rj + 1) * region, g):
                        ys = range(py, min(py + g, h))
                        xs = range(px, min(px + g, w))
                        if len(ys) == 0 or len(xs) == 0:
                            continue
                        queries.append(torch.stack([spatial[i, j] for i in ys for j in xs]).mean(0))
                        centers.append([sum(i + 0.5 for i in ys) / len(ys), sum(j + 0.5 for j in xs) / len(xs)])
                        members.append([(i, j) for i in ys for j in xs])
        q = torch.stack([*x[b, :num_extra], *queries])[None]
        cen = torch.tensor([[0.0, 0.0]] * num_extra + centers)[None]
        y = block.forward_queries(q, x[b : b + 1], hw, cen)[0]
        out[b, :num_extra] = y[:num_extra]
        for k, toks in enumerate(members):
            for i, j in toks:
                out[b, num_extra + i * w + j] = x[b, num_extra + i * w + j] + y[num_extra + k] - q[0, num_extra + k]
    return out
