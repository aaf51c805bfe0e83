"""The dynamic grained router (Sec. 3.2.2): one granularity per region."""
import contextlib
import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["GrainedRouter", "MAX_BUDGETS"]

MAX_BUDGETS = 8  # inference budgets (β targets) whose calibrated offsets a router keeps


class GrainedRouter(nn.Module):
    """Gating network of Eq. 1 and the selection of Eq. 2 (inference) / Eq. 4-5 (training).

    Args:
        dim: channels C of the region features.
        num_choices: K, the number of candidate granularities.
        fine_index: index of the finest granularity among the K choices; its initial
            probability is ``init_fine_prob`` (default in ``DGEOptions``) so that a fresh DGE
            model starts close to the vanilla one.

    Inference budgets: ``budget_targets`` / ``budget_offsets`` (buffers, saved with the
    model) keep up to ``MAX_BUDGETS`` calibrated β targets (0: a free slot) and, for each,
    the offset added to the finest choice's logit; ``budget_offset`` (not saved) is the offset
    in use, added in eval mode only (``dge.layers.inference_budget``). 0: as trained.
    """

    def __init__(self, dim: int, num_choices: int, fine_index: int = 0, *, init_fine_prob: float):
        super().__init__()
        if not 0.0 < init_fine_prob < 1.0:
            raise ValueError(f"init_fine_prob must be in (0, 1); got {init_fine_prob}")
        self.num_choices = num_choices
        self.fine_index = fine_index
        self.gate = nn.Linear(dim, num_choices)
        nn.init.trunc_normal_(self.gate.weight, std=0.01)
        bias = torch.zeros(num_choices)
        if num_choices > 1:
            # softmax gives the fine choice p = init_fine_prob when it has +b, all others -b.
            b = 0.5 * math.log(init_fine_prob * (num_choices - 1) / (1.0 - init_fine_prob))
            bias.fill_(-b)
            bias[fine_index] = b
        with torch.no_grad():
            self.gate.bias.copy_(bias)
        self.register_buffer("budget_targets", torch.zeros(MAX_BUDGETS))  # 0: a free slot
        self.register_buffer("budget_offsets", torch.zeros(MAX_BUDGETS))
        self.register_buffer("budget_offset", torch.zeros(()), persistent=False)
        self.register_buffer("_fine", F.one_hot(torch.tensor(fine_index), num_choices).float(), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints from before inference budgets have no table: an empty one, not "missing".
        for name in ("budget_targets", "budget_offsets"):
            state_dict.setdefault(prefix + name, getattr(self, name).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, region_features: torch.Tensor) -> torch.Tensor:
        """region_features: [B, Hr, Wr, C] region averages -> gating logits [B, Hr, Wr, K],
        float32 in any activation dtype and under autocast: the choice, the Gumbel noise and
        the scores do not depend on the precision the blocks run in (the gate is C×K: the
        casts cost nothing; in float32 they are no-ops)."""
        x = region_features.float()
        device = x.device.type
        exact = torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
        with exact:
            logits = F.linear(x, self.gate.weight.float(), self.gate.bias.float())  # Eq. 1
            if not self.training:  # the inference budget in use (0: the routers as trained)
                logits = logits + self.budget_offset * self._fine
            return logits

    @staticmethod
    def select(
        logits: torch.Tensor, stochastic: bool, tau: float = 1.0
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Pick one choice per region.

        Args:
            logits: [B, Hr, Wr, K].
            stochastic: Gumbel sampling (training) instead of argmax (inference).
            tau: temperature of the soft score.
        Returns:
            index: [B, Hr, Wr] long, the chosen choice per region.
            probs: [B, Hr, Wr, K] soft scores (Gumbel-softmax) when ``stochastic``, else None.
        """
        if not stochastic:
            return logits.argmax(dim=-1), None  # Eq. 2
        u = torch.rand_like(logits, dtype=torch.float32).clamp_(min=1e-10, max=1.0 - 1e-7)
        logits = logits.float()
        noisy = logits - torch.log(-torch.log(u))  # h + g, g ~ Gumbel(0, 1)
        index = noisy.argmax(dim=-1)  # Eq. 4
        probs = F.softmax(noisy / tau, dim=-1)  # Eq. 5 (p_i is probs at index)
        return index, probs

    def flops(self, num_regions: int) -> float:
        """Multiply-adds of the gate for ``num_regions`` regions (the pooling is not counted)."""
        return float(num_regions * self.gate.in_features * self.gate.out_features)
