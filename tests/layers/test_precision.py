"""Half precision and autocast: β does not depend on the activation dtype, training under
autocast keeps a float32 residual stream, positions stay float32. The CUDA cases are in
test_cuda.py."""
import os

import pytest
import torch

import dge  # noqa: F401  (registers the timm models)
from dge.layers import DeformableAttention, DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
from dge.layers import budget_loss, complexity_report, dge_modules
from dge.layers.kernels import packed_attention_available
from model_helpers import forced_routing, granularity_maps, recorded, routed_model

HALF = [torch.float16, torch.bfloat16]
MODELS = ["pvt_tiny_dge", "dpvt_tiny_dge", "deit_tiny_dge"]
# DGE_PRECISION_PAPER=1: the half-precision β check on the paper's models at their input sizes
# (PVT-S / DPVT-S at 800×1280 as in detection, DeiT-S at 224), about a minute on 2 cores.
if os.environ.get("DGE_PRECISION_PAPER"):
    HALF_CASES = [("pvt_small_dge", (800, 1280)), ("dpvt_small_dge", (800, 1280)), ("deit_small_dge", (224, 224))]
else:
    HALF_CASES = [(name, (224, 224)) for name in MODELS]


def reference_beta(record) -> float:
    """β of the forward in ``record`` recomputed in float64 on the host from the hard query counts."""
    dynamic = static = 0.0
    for info in record.infos:
        fixed, per_query, delta = info.block_cost
        dynamic += fixed + info.router_flops + per_query * (float(info.num_queries[0]) + info.num_extra)
        static += fixed + delta + per_query * (info.num_tokens + info.num_extra)
    return dynamic / static


@pytest.mark.parametrize("name,hw", HALF_CASES, ids=[f"{n}-{h[0]}x{h[1]}" for n, h in HALF_CASES])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_model_beta_equals_float32(name, hw, dtype):
    torch.manual_seed(1)
    x = torch.randn(1, 3, *hw)
    model = routed_model(name, x)
    with torch.no_grad():
        _, record = recorded(model, x)
        assert 0.3 < complexity_report(record).beta.item() < 0.7
        with forced_routing(model, granularity_maps(record)):
            _, record = recorded(model, x)
            beta32 = complexity_report(record).beta
            model.to(dtype)
            y, record = recorded(model, x.to(dtype))
            forced = complexity_report(record)
        _, record = recorded(model, x.to(dtype))  # its own routers, in dtype
    assert torch.isfinite(y).all()
    assert forced.beta.dtype == torch.float32 and forced.dynamic_flops.dtype == torch.float32
    torch.testing.assert_close(forced.beta, beta32, rtol=1e-6, atol=0.0)
    routed = complexity_report(record).beta
    assert torch.isfinite(routed).all() and routed.dtype == torch.float32
    assert routed.item() == pytest.approx(reference_beta(record), rel=1e-6)


@pytest.mark.parametrize("name", ["pvt_tiny_dge", "dpvt_tiny_dge"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_training_step(name, dtype):
    """A training step under autocast: finite loss and router gradients, β as in float32 for
    the same draws, and the residual stream (every DGE block's output) in float32."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 128, 128)
    model = routed_model(name, x[:1]).train()
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out.dtype)) for m in dge_modules(model)]

    def step(autocast: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same Gumbel draws and drop-path masks
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            logits, record = recorded(model, x)
            beta = complexity_report(record).beta
            loss = logits.float().logsumexp(dim=1).mean() + budget_loss(beta, 0.5, 2.0)
        loss.backward()
        grads = [m.router.gate.weight.grad.clone() for m in dge_modules(model)]
        return loss.detach(), beta.detach(), granularity_maps(record), grads

    loss32, beta32, maps32, _ = step(False)
    outputs.clear()
    loss, beta, routing, grads = step(True)
    for h in hooks:
        h.remove()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert set(outputs) == {torch.float32}, f"residual stream left float32: {set(outputs)}"
    assert all(torch.equal(a, b) for a, b in zip(maps32, routing)), "routing differs under autocast"
    torch.testing.assert_close(beta, beta32, rtol=1e-6, atol=0.0)
    assert abs(loss.item() - loss32.item()) < 0.05 * abs(loss32.item()) + 0.05


def test_router_scores_float32_under_autocast():
    block = EncoderBlock(32, SpatialReductionAttention(32, 2, sr_ratio=2))
    dge_block = DynamicGrainedEncoder(block, 32, dict(granularities=(1, 2, 4))).train()
    x = torch.randn(1, 16 * 16, 32)
    with torch.autocast("cpu", dtype=torch.float16):
        _, record = recorded(dge_block, x, (16, 16))
    assert record.of(dge_block).query_count.dtype == torch.float32
    logits = dge_block.router(torch.randn(1, 2, 2, 32).half())
    assert logits.dtype == torch.float32


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_deformable_positions_float32(dtype):
    """On a 320-token-wide map a bfloat16 sampling location is up to a token off; sampling
    at float32 positions keeps the half-precision output close to float32's."""
    torch.manual_seed(4)
    attn = DeformableAttention(32, 2, num_points=4).eval()
    torch.nn.init.normal_(attn.offsets.weight, std=0.05)
    h, w = 4, 320
    x = torch.randn(1, h * w, 32)
    from dge.layers.grained import token_centers

    centers = token_centers(h, w)[None]
    with torch.no_grad():
        ref = attn(x, x, (h, w), centers)
        out = attn.to(dtype)(x.to(dtype), x.to(dtype), (h, w), centers)
    error = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert error < (0.02 if dtype == torch.bfloat16 else 0.005), error


def test_packed_attention_not_used_on_cpu():
    q = torch.randn(1, 8, 64, dtype=torch.float16)
    assert not packed_attention_available(q, 32, 0.0)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_mask_rcnn_training_step_under_autocast(data_root, dtype):
    """The demo Mask R-CNN's losses under CPU autocast (what AMPTrainer does on a GPU):
    finite, the budget loss from a float32 β, finite router gradients."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from dge.config import load_config

    cfg = load_config("configs/demo_pvt_dge_synthetic.yaml", ["DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2])
    torch.manual_seed(8)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    with EventStorage(), torch.autocast("cpu", dtype=dtype):
        losses = model(batch)
    assert "loss_budget" in losses and all(torch.isfinite(v) for v in losses.values()), losses
    assert losses["loss_budget"].dtype == torch.float32
    sum(losses.values()).backward()
    grads = [m.router.gate.weight.grad for m in dge_modules(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
