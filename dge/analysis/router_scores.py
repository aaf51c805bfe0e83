"""What a trained model's routers score, per stage: the mean score of each granularity
without noise, the β of the argmax routing (inference, Eq. 2) and the β of Gumbel sampling
(training, Eq. 4), on the same images. A stage whose routers give the finest choice most
but not all of the probability routes coarser in training than at inference."""
import contextlib
from typing import Callable, Dict, Iterable, Iterator, List

import numpy as np
import torch
from torch import nn

from ..layers import complexity_report, dge_modules, dge_stages, record_routing

__all__ = ["sampled_routing", "stage_router_scores", "format_router_scores"]


@contextlib.contextmanager
def sampled_routing(model: nn.Module) -> Iterator[None]:
    """While active, the DGE blocks of an eval-mode ``model`` route as in training (Gumbel
    sampling) and nothing else changes: their blocks, the routers' inference budget and the
    rest of the model stay in eval mode."""
    blocks = [m for m in dge_modules(model) if not m.training]
    for m in blocks:
        m.training = True
    try:
        yield
    finally:
        for m in blocks:
            m.training = False


def _stage_betas(model: nn.Module, record) -> List[float]:
    report = complexity_report(record, model)
    return [report.group_beta([i for i, _, _ in layers]).mean().item() for layers in dge_stages(model).values()]


@torch.no_grad()
def stage_router_scores(model: nn.Module, runs: Iterable[Callable[[], object]], draws: int = 4) -> List[Dict]:
    """Per stage of ``model`` (its DGE blocks grouped by ``dge_stages``), over ``runs`` (each
    runs the eval-mode model on one input): ``stage``, ``granularities``, ``mean_probs`` [K]
    (softmax of the router logits, no noise, averaged over regions, blocks and images),
    ``argmax_share`` [K], ``fine_margin`` (mean logit of the finest φ minus the largest
    other), ``beta_argmax`` and ``beta_sampled`` (mean of ``draws`` Gumbel draws)."""
    stages = dge_stages(model)
    logits: Dict[nn.Module, List[torch.Tensor]] = {m: [] for m in dge_modules(model) if m.router is not None}
    hooks = [m.router.register_forward_hook(lambda _, __, out, m=m: logits[m].append(out.float().flatten(0, -2)))
             for m in logits]
    argmax, sampled = [], []
    try:
        for run in runs:
            with record_routing() as record:
                run()
            argmax.append(_stage_betas(model, record))
            with sampled_routing(model):
                for _ in range(draws):
                    with record_routing() as record:
                        run()
                    sampled.append(_stage_betas(model, record))
                    for m in logits:
                        logits[m].pop()  # keep the noise-free logits only
    finally:
        for hook in hooks:
            hook.remove()
    rows = []
    for k, (name, layers) in enumerate(stages.items()):
        blocks = [m for _, _, m in layers if m in logits]
        if not blocks or not argmax:
            continue
        stage_logits = torch.cat([x for m in blocks for x in logits[m]])  # [regions, K]
        fine = blocks[0].router.fine_index
        others = torch.cat([stage_logits[:, :fine], stage_logits[:, fine + 1 :]], dim=1)
        choices = torch.bincount(stage_logits.argmax(-1), minlength=stage_logits.shape[1])
        rows.append(dict(
            stage=name, granularities=list(blocks[0].granularities),
            mean_probs=stage_logits.softmax(-1).mean(0).tolist(),
            argmax_share=choices.div(len(stage_logits)).tolist(),
            fine_margin=(stage_logits[:, fine] - others.max(dim=1).values).mean().item(),
            beta_argmax=float(np.mean([b[k] for b in argmax])), beta_sampled=float(np.mean([b[k] for b in sampled])),
        ))
    return rows


def format_router_scores(rows: List[Dict]) -> str:
    """One line per stage."""
    lines = []
    for i, r in enumerate(rows, start=1):
        probs = " ".join(f"p(φ={g}) {p:.3f}" for g, p in zip(r["granularities"], r["mean_probs"]))
        share = " ".join(f"{s:.2f}" for s in r["argmax_share"])
        lines.append(f"stage {i}: {probs}  argmax share {share}  fine margin {r['fine_margin']:+.2f}  "
                     f"β argmax {r['beta_argmax']:.3f}  β sampled {r['beta_sampled']:.3f}")
    return "\n".join(lines)
