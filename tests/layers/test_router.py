"""The router (``dge.layers.router``): its initialisation, the straight-through gradient of Eq. 5-6
and the budget loss's gradient (Eq. 8)."""
import math

import torch

from dge.layers import (
    DynamicGrainedEncoder,
    GrainedRouter,
    budget_loss,
    complexity_report,
)
from model_helpers import encoder_block, recorded

C = 16


def test_router_initially_prefers_the_finest_granularity():
    for phi, fine in [((1, 2, 4), 0), ((0, 1), 1), ((1, 2, 4, 8), 0)]:
        router = GrainedRouter(C, len(phi), fine_index=fine, init_fine_prob=0.95)
        p = torch.softmax(router(torch.zeros(1, 1, 1, C)), dim=-1)[0, 0, 0]
        assert abs(p[fine].item() - 0.95) < 1e-4
    # vtpack's value for K = 3: ±log√38.
    assert abs(GrainedRouter(C, 3, init_fine_prob=0.95).gate.bias[0].item() - math.log(math.sqrt(38))) < 1e-5


def test_straight_through_gradient_of_the_router_is_analytic():
    """Eq. 5-6: forward ŷ, backward p·ŷ, so dL/dh_k = Σ_i <ŷ_i, dL/dy_i> · dp_i/dh_k."""
    block = encoder_block("pvt", seed=8)
    dge = DynamicGrainedEncoder(block, C, dict(gumbel_tau=0.7)).train()
    hw = (8, 12)
    x = torch.randn(2, 96, C)
    weights = torch.randn(2, 96, C)
    recorded = {}
    original = GrainedRouter.select

    def recording_select(logits, stochastic, tau=1.0):
        index, probs = original(logits, stochastic, tau)
        recorded.update(index=index, probs=probs.detach())
        return index, probs

    GrainedRouter.select = staticmethod(recording_select)
    try:
        out = dge(x, hw)
    finally:
        GrainedRouter.select = staticmethod(original)
    (out * weights).sum().backward()

    index, probs = recorded["index"], recorded["probs"]
    gmap = torch.tensor(dge.granularities)[index]
    with torch.no_grad():
        delta = dge.eval()(x, hw, gmap) - x  # ŷ unpooled, same value as in training
    region = (torch.arange(8)[:, None] // 4 * 3 + torch.arange(12)[None, :] // 4).reshape(-1)
    dl_dp = torch.zeros(2, 6).index_add_(1, region, (delta * weights).sum(-1))  # [B, R]
    p = probs.view(2, 6, 3)
    chosen = index.view(2, 6)
    p_theta = p.gather(-1, chosen[..., None])[..., 0]
    one_hot = torch.nn.functional.one_hot(chosen, 3).float()
    dp_dh = p_theta[..., None] * (one_hot - p) / 0.7  # softmax Jacobian row of the chosen k
    expected = (dl_dp[..., None] * dp_dh).sum(dim=(0, 1))
    assert torch.allclose(dge.router.gate.bias.grad, expected, atol=1e-4, rtol=1e-3)


def test_budget_loss_gradient_reaches_the_router_and_lowers_fine_scores():
    block = encoder_block("pvt", seed=9)
    dge = DynamicGrainedEncoder(block, C).train()
    hw = (8, 8)
    x = torch.randn(4, 64, C)
    _, record = recorded(dge, x, hw)
    report = complexity_report(record)
    loss = budget_loss(report.beta, budget=0.25, weight=1.0)
    loss.backward()
    grad = dge.router.gate.bias.grad
    assert grad is not None and grad.abs().sum() > 0
    # Descending the loss raises the coarse logits relative to the finest one.
    assert grad[0] > 0 and grad[2] < grad[0]
