"""The router gradient estimators of ``DGEOptions.estimator`` against a reference written
from the official code's formulas (vtpack: ``layers/dge.py`` DynamicGrainedEncoder.compress /
decompress / get_complexity and ``layers/grained_sample.py``'s dense sampling), with the same
Gumbel noise: "official" gives vtpack's task-loss and budget-loss gradients, "official_sparse"
vtpack's ``sparse_train``, "paper" Eq. 6-7."""
import pytest
import torch
from torch.nn import functional as F

from dge.layers import (
    DeformableAttention,
    DynamicGrainedEncoder,
    EncoderBlock,
    SpatialReductionAttention,
    budget_loss,
    complexity_report,
    record_routing,
)

C = 16
PHI = (1, 2, 4)
GAMMA = 0.3


def make_block(kind: str, seed: int = 0) -> EncoderBlock:
    torch.manual_seed(seed)
    if kind == "deformable":
        attn = DeformableAttention(C, num_heads=2, num_points=3)
        torch.nn.init.normal_(attn.offsets.weight, std=0.3)
    else:
        attn = SpatialReductionAttention(C, num_heads=2, sr_ratio=2 if kind == "pvt" else 1)
    return EncoderBlock(C, attn, mlp_ratio=2.0)


def _patch_centers(h: int, w: int, g: int, b: int) -> torch.Tensor:
    ys = torch.arange(0, h, g, dtype=torch.float32) + g / 2
    xs = torch.arange(0, w, g, dtype=torch.float32) + g / 2
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(1, -1, 2).expand(b, -1, -1)


def vtpack_dense(block, gate_layer, x, hw, u, e, tau=1.0):
    """vtpack's training forward (sparse_train False), written out: hard Gumbel-softmax over
    the K granularities, every granularity's patches through the block, each update unpooled
    and weighted by its gate; the query count Σ_k gate_k · (patches of k) + E.
    -> (output [B, N, C], query count [B] with its straight-through gradient)."""
    b, _, c = x.shape
    h, w = hw
    s = max(PHI)
    spatial = x[:, e:].reshape(b, h, w, c).permute(0, 3, 1, 2)
    logits = gate_layer(F.avg_pool2d(spatial, s).permute(0, 2, 3, 1))  # DynamicRouter: gate_pool, gate
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), len(PHI)).to(soft)
    gate = hard - soft.detach() + soft  # F.gumbel_softmax(hard=True)
    comp = [F.avg_pool2d(spatial, g).flatten(2).transpose(1, 2) for g in PHI]  # grained_sample_compress_dense
    queries = torch.cat([x[:, :e]] + comp, dim=1)
    centers = torch.cat([torch.zeros(b, e, 2)] + [_patch_centers(h, w, g, b) for g in PHI], dim=1)
    delta = block.forward_queries(queries, x, hw, centers) - queries
    out, start = 0, e
    for k, g in enumerate(PHI):  # grained_sample_decompress_dense
        d = delta[:, start : start + (h // g) * (w // g)].reshape(b, h // g, w // g, c)
        start += (h // g) * (w // g)
        d = d.repeat_interleave(g, 1).repeat_interleave(g, 2)
        out = out + d * gate[..., k].repeat_interleave(s, 1).repeat_interleave(s, 2)[..., None]
    out = torch.cat([x[:, :e] + delta[:, :e], x[:, e:] + out.reshape(b, h * w, c)], dim=1)
    patches = torch.tensor([(s // g) ** 2 for g in PHI], dtype=torch.float32)
    return out, (gate * patches).flatten(1).sum(1) + e  # get_complexity's num_queries


def reference_losses(block, gate_layer, x, hw, u, e, weights):
    """(task loss, budget loss) of vtpack's training step, the budget from β (Eq. 7) with
    dge's block cost (the FLOP convention β keeps)."""
    out, count = vtpack_dense(block, gate_layer, x, hw, u, e)
    fixed, per_query = block.complexity(hw, e)
    router = gate_layer.in_features * gate_layer.out_features * (hw[0] // 4) * (hw[1] // 4)
    beta = (fixed + router + per_query * count) / (fixed + per_query * (hw[0] * hw[1] + e))
    return (out * weights).sum(), budget_loss(beta, GAMMA)


def dge_losses(layer, x, hw, seed, weights):
    torch.manual_seed(seed)
    with record_routing() as record:
        out = layer(x, hw)
    return (out * weights).sum(), budget_loss(complexity_report(record).beta, GAMMA)


def gradients(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def setup(kind, estimator, e=0, hw=(8, 12), seed=0):
    layer = DynamicGrainedEncoder(make_block(kind, seed), C, dict(estimator=estimator, init_fine_prob=0.4),
                                  num_extra_tokens=e).train()
    torch.nn.init.normal_(layer.router.gate.weight, std=0.3)  # regions that differ in their scores
    x = torch.randn(2, e + hw[0] * hw[1], C)
    return layer, x, hw, torch.randn_like(x)


def noise(layer, x, hw, seed):
    """The uniform draws of the layer's Gumbel noise for ``seed``."""
    torch.manual_seed(seed)
    return torch.rand(x.shape[0], hw[0] // 4, hw[1] // 4, len(PHI)).clamp_(min=1e-10, max=1.0 - 1e-7)


@pytest.mark.parametrize("kind,e", [("pvt", 0), ("global", 1), ("deformable", 0)])
def test_official_estimator_gives_vtpack_gradients(kind, e):
    layer, x, hw, weights = setup(kind, "official", e)
    task, budget = dge_losses(layer, x, hw, 5, weights)
    ref_task, ref_budget = reference_losses(layer.block, layer.router.gate, x, hw, noise(layer, x, hw, 5), e, weights)
    assert abs(task.item() - ref_task.item()) < 1e-4 * abs(ref_task.item())
    assert abs(budget.item() - ref_budget.item()) < 1e-6
    router = list(layer.router.parameters())
    blocks = list(layer.block.parameters())
    assert relative(gradients(task, router), gradients(ref_task, router)) < 1e-5
    assert relative(gradients(task, blocks), gradients(ref_task, blocks)) < 1e-5
    assert relative(gradients(budget, router), gradients(ref_budget, router)) < 1e-5
    assert gradients(ref_budget, router).norm() > 0


def test_paper_and_official_sparse_split_the_two_gradients():
    """official_sparse: the task gradient of "paper" (Eq. 6), the budget gradient of vtpack;
    "paper"'s budget gradient (Eq. 7, the chosen score only) points elsewhere."""
    grads = {}
    for estimator in ("paper", "official", "official_sparse"):
        layer, x, hw, weights = setup("pvt", estimator, seed=3)
        task, budget = dge_losses(layer, x, hw, 9, weights)
        router = list(layer.router.parameters())
        grads[estimator] = gradients(task, router), gradients(budget, router)
    assert relative(grads["official_sparse"][0], grads["paper"][0]) < 1e-6
    assert relative(grads["official_sparse"][1], grads["official"][1]) < 1e-6
    assert relative(grads["paper"][0], grads["official"][0]) > 0.1
    cosine = F.cosine_similarity(grads["paper"][1], grads["official"][1], dim=0).item()
    assert cosine < 0.99


@pytest.mark.parametrize("estimator", ["paper", "official", "official_sparse"])
def test_estimators_under_autocast_follow_float32(estimator):
    """bfloat16 autocast on the CPU: the routing and its scores are float32 (the router runs
    outside autocast), so the router gradients follow float32's."""
    layer, x, hw, weights = setup("pvt", estimator, seed=4)
    router = list(layer.router.parameters())
    task, budget = dge_losses(layer, x, hw, 2, weights)
    exact = gradients(task + budget, router)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        task, budget = dge_losses(layer, x, hw, 2, weights)
    low = gradients(task.float() + budget, router)
    assert torch.isfinite(low).all()
    assert F.cosine_similarity(low, exact, dim=0).item() > 0.99


def test_an_unknown_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator must be one of"):
        DynamicGrainedEncoder(make_block("pvt"), C, dict(estimator="vtpack"))


def test_the_config_key_reaches_every_block_and_the_old_key_says_what_replaced_it():
    from detectron2.modeling import build_model

    import dge  # noqa: F401  (registers the backbones)
    from dge.config import load_config
    from dge.layers import dge_modules

    cfg = load_config("configs/demo_pvt_dge_synthetic.yaml", ["MODEL.DGE.ESTIMATOR", "official_sparse"])
    assert {m.options.estimator for m in dge_modules(build_model(cfg))} == {"official_sparse"}
    with pytest.raises(KeyError, match="MODEL.DGE.ESTIMATOR official"):
        load_config("configs/demo_pvt_dge_synthetic.yaml", ["MODEL.DGE.DENSE_TRAIN", "True"])
    with pytest.raises(ValueError, match="estimator must be one of"):
        build_model(load_config("configs/demo_pvt_dge_synthetic.yaml", ["MODEL.DGE.ESTIMATOR", "dense"]))


def test_router_scores_compare_the_inference_and_the_training_routing():
    """A fresh model (p(φ=1) = 0.95 everywhere): argmax keeps every region at φ = 1, Gumbel
    sampling routes about 5% coarser; the model is back in eval mode afterwards."""
    import timm

    from dge.analysis.router_scores import stage_router_scores
    from dge.layers import dge_modules

    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny_dge", img_size=64).eval()
    x = torch.randn(2, 3, 64, 96)
    rows = stage_router_scores(model, [lambda: model.forward_features(x)], draws=6)
    assert len(rows) == 4
    for r in rows:
        assert r["beta_argmax"] == pytest.approx(1.0, abs=1e-3)  # + the router's own cost
        assert r["argmax_share"] == [1.0, 0.0, 0.0]
        assert r["mean_probs"][0] == pytest.approx(0.95, abs=0.01)
        assert r["fine_margin"] > 3.0
    assert sum(r["beta_sampled"] for r in rows[:3]) / 3 < 0.99
    assert not any(m.training for m in dge_modules(model))


@pytest.mark.parametrize("estimator", ["paper", "official", "official_sparse"])
def test_a_training_step_after_inference_mode_runs(estimator):
    """The layout cached by an inference-mode forward (a benchmark's calibration, an
    evaluation) serves the next training step of every estimator."""
    layer, x, hw, weights = setup("pvt", estimator, seed=6)
    with torch.inference_mode():
        layer.eval()(x, hw)
    task, budget = dge_losses(layer.train(), x, hw, 1, weights)
    (task + budget).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
