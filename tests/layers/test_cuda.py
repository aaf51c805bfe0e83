"""The GPU path, checked where a CUDA device is present (each CUDA case skips with its reason
elsewhere; the CPU cases run everywhere): packed ``varlen_attn`` against padded attention,
outputs and gradients (q, kv, the router's) in float16 and bfloat16; which kernels run; a
training step's gradients on CUDA against the CPU in float32 (TF32 off); host syncs counted
by CUDA itself; and the padded path's gradients against a float64 reference on every device.
``tools/device_check.sh`` runs this file on a GPU machine."""
import pytest
import torch

import dge  # noqa: F401  (registers the timm models)
from dge.analysis.gpu_checks import GRADIENT_NAMES, HALF_TOLERANCE, block_training_step, host_gumbel_noise, sync_case
from dge.analysis.gpu_checks import relative_difference as relative
from dge.analysis.syncs import count_cuda_syncs
from dge.layers import budget_loss
from dge.layers import complexity_report
from dge.layers.kernels import packed_attention_available
from model_helpers import recorded, routed_model

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture
def no_tf32():
    """Exact float32 on the GPU (torch keeps TF32 on for cuDNN convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
def test_padded_attention_gradients_equal_a_float64_reference(device, no_tf32):
    """The padded path in float32 (segments of one image's rows with that image's keys, images
    with different query counts) against float64 on the CPU with each image alone: output,
    input and every weight's gradient (attention q / kv / proj, router)."""
    ref = block_training_step("cpu", torch.float64, alone=True)
    out = block_training_step(device, torch.float32, packed=False)
    assert torch.equal(out["maps"], ref["maps"])
    counts = [(m == 1).sum().item() for m in ref["maps"]]
    assert len(set(counts)) > 1, "the images should keep different query counts"
    for name in ("out", "x", "block.attn.q.weight", "block.attn.kv.weight", "block.attn.proj.weight", "router.gate.weight"):
        assert ref[name].abs().max() > 0, f"{name}: the reference gradient is zero"
        assert relative(out[name], ref[name]) < 1e-4, name


@CUDA
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cuda_varlen_equals_padded_outputs_and_gradients(dtype):
    """Packed rows through flash varlen_attn against the padded path (SDPA), same device and
    dtype: outputs and gradients of the input, q, kv and the router. Catches a kernel that
    returns wrong or all-zero dQ/dK/dV (cuDNN 9.22-9.26 on sm90, cudnn-frontend PR #462)."""
    if not packed_attention_available(torch.zeros(1, 8, 64, device="cuda", dtype=dtype), 32, 0.0):
        pytest.skip("this GPU or torch has no flash varlen attention")
    ref = block_training_step("cpu", torch.float64, alone=True)
    varlen = block_training_step("cuda", dtype, packed=True)
    padded = block_training_step("cuda", dtype, packed=False)
    assert torch.equal(varlen["maps"], padded["maps"])
    tol = HALF_TOLERANCE[dtype]
    for name in GRADIENT_NAMES:
        assert varlen[name].abs().max() > 0, f"{name}: zero gradient through varlen_attn"
        assert relative(varlen[name], padded[name]) < tol, name
        if torch.equal(varlen["maps"], ref["maps"]):  # the same routing as float64 (no near tie flipped)
            assert relative(varlen[name], ref[name]) < tol, name


@CUDA
def test_cuda_attention_kernels_flash_or_memory_efficient():
    """Every attention call of a DGE block (packed fp16 rows, padded fp32 segments, forward and
    backward) runs on flash / memory-efficient kernels, not cuDNN's per-shape plans; the
    packed rows do go through varlen_attn."""
    from torch.profiler import ProfilerActivity, profile

    names = set()
    for dtype in (torch.float16, torch.float32):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            block_training_step("cuda", dtype)
        names |= {e.name for e in prof.events()}
    assert not [n for n in names if "cudnn_attention" in n], sorted(n for n in names if "attention" in n)
    if packed_attention_available(torch.zeros(1, 8, 64, device="cuda", dtype=torch.float16), 32, 0.0):
        assert "torch_attn::_varlen_attn" in names or "aten::_flash_attention_forward" in names
    assert "aten::_efficient_attention_forward" in names or "aten::_flash_attention_forward" in names


@CUDA
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("attention", ["sr", "deformable"])
def test_cuda_block_syncs_only_for_its_nonzero(attention, batch, training):
    """CUDA's own count (set_sync_debug_mode) of the syncs of one DGE block."""
    fn = sync_case("cuda", attention, batch, training)
    with torch.set_grad_enabled(training):
        fn()
        assert count_cuda_syncs(fn) == 1


@CUDA
@pytest.mark.parametrize("name", ["pvt_tiny_dge", "dpvt_tiny_dge", "deit_tiny_dge"])
def test_cuda_model_equals_cpu_float32(name, no_tf32):
    torch.manual_seed(6)
    x = torch.randn(2, 3, 160, 160)
    model = routed_model(name, x[:1])
    with torch.no_grad():
        ref, record = recorded(model, x)
        beta_ref = complexity_report(record).beta
        model.cuda()
        out, record = recorded(model, x.cuda())
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(complexity_report(record).beta.cpu(), beta_ref, rtol=1e-6, atol=0.0)


def model_step(model, x, seed: int) -> dict:
    """One training step (logits + budget loss) with Gumbel noise drawn on the CPU: every
    parameter's gradient and the routing."""
    model.zero_grad(set_to_none=True)
    with host_gumbel_noise(seed):
        logits, record = recorded(model, x)
    loss = logits.float().logsumexp(dim=1).mean() + budget_loss(complexity_report(record).beta, 0.5, 2.0)
    loss.backward()
    grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return dict(grads, maps=[info.granularity_map.cpu() for info in record.infos])


@CUDA
@pytest.mark.parametrize("name", ["pvt_tiny_dge", "dpvt_tiny_dge"])
def test_cuda_training_step_gradients_equal_cpu_float32(name, no_tf32):
    """A whole model's training step at batch 2 on CUDA and on the CPU, same weights, input and
    Gumbel noise: the same routing and the same gradients, routers included."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 128, 128)
    model = routed_model(name, x[:1]).train()
    ref = model_step(model, x, seed=8)
    out = model_step(model.cuda(), x.cuda(), seed=8)
    assert all(torch.equal(a, b) for a, b in zip(out["maps"], ref["maps"])), "routing differs on CUDA"
    routers = [n for n in ref if n.endswith("router.gate.weight")]
    assert routers and all(ref[n].abs().max() > 0 for n in routers)
    for n in ref:
        if n != "maps":
            assert relative(out[n], ref[n]) < 1e-3, n


@CUDA
@pytest.mark.parametrize("name", ["pvt_tiny_dge", "dpvt_tiny_dge"])
def test_cuda_autocast_training_step(name):
    """An AMP step (fp16 autocast, GradScaler): finite loss, and attention and routers that
    learn (non-zero, finite gradients), not only finite values."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 128, 128, device="cuda")
    model = routed_model(name, x[:1].cpu()).cuda().train()
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        logits, record = recorded(model, x)
        loss = logits.float().logsumexp(dim=1).mean() + budget_loss(complexity_report(record).beta, 0.5, 2.0)
    scaler.scale(loss).backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for key in ("router.gate.weight", "attn.q.weight" if name.startswith("pvt") else "attn.offsets.weight"):
        chosen = [g for n, g in grads.items() if n.endswith(key)]
        assert chosen and all(torch.isfinite(g).all() for g in chosen), key
        assert sum(g.float().abs().sum() for g in chosen) > 0, f"{key}: all gradients zero under AMP"
