"""No host reads in the hot path: on a GPU each read of a tensor's value waits for the device,
and a tensor made from host data is a blocking copy. Counted on the CPU both as the profiler
sees them (nonzero, _local_scalar_dense) and as Python calls (tolist, new_tensor, torch.tensor
... dispatch no aten op on the CPU; ``dge.analysis.syncs.count_host_reads``)."""
import pytest
import timm
import torch
from detectron2.utils.events import EventStorage

import dge  # noqa: F401  (registers the timm models)
from dge.analysis.syncs import count_host_reads
from dge.layers import BudgetLoss, DynamicGrainedEncoder
from dge.layers import dge_modules
from model_helpers import encoder_block, recorded

C = 16
ONE_NONZERO = {"aten::nonzero": 1}


def mixed_dge(kind: str, phi=(1, 2, 4), extra: int = 0) -> DynamicGrainedEncoder:
    layer = DynamicGrainedEncoder(encoder_block(kind), C, dict(granularities=phi), num_extra_tokens=extra).eval()
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)  # mixed routing: every φ in use
    torch.nn.init.zeros_(layer.router.gate.bias)
    return layer


CASES = [("pvt", (1, 2, 4), 0), ("deformable", (1, 2, 4), 0), ("global", (0, 1, 2), 1)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind, phi, extra", CASES, ids=[c[0] for c in CASES])
def test_block_inference_reads_only_its_one_nonzero(kind, phi, extra, batch):
    """The query count comes from the shape of one nonzero; at batch 2 the images' different
    counts pad attention by bounds known on the host, not by a read of the counts."""
    layer = mixed_dge(kind, phi, extra)
    hw = (13, 18)
    x = torch.randn(batch, extra + hw[0] * hw[1], C)
    with torch.no_grad():
        _, record = recorded(layer, x, hw)
        counts = record.of(layer).num_queries
        assert len(record.of(layer).granularity_map.unique()) == len(phi)
        if batch == 2:
            assert counts[0] != counts[1], "the images should keep different query counts"
        assert count_host_reads(lambda: layer(x, hw)) == ONE_NONZERO


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("kind", ["pvt", "deformable"])
def test_vanilla_block_reads_nothing(kind, batch):
    block = encoder_block(kind)
    x = torch.randn(batch, 13 * 18, C)
    with torch.no_grad():
        assert count_host_reads(lambda: block(x, (13, 18))) == {}


@pytest.mark.parametrize("name", ["pvt_tiny_dge", "dpvt_tiny_dge"])
def test_training_step_reads_one_nonzero_per_block(name):
    """Forward, β, budget loss and backward of a whole model at batch 2: one nonzero per DGE
    block and nothing else (no per-step read either)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 96, 96)
    budget = BudgetLoss(0.5, 1.0)

    def step():
        logits, record = recorded(model, x)
        loss, _ = budget(model, record)
        (logits.logsumexp(dim=1).mean() + loss).backward()

    step()
    assert count_host_reads(step) == {"aten::nonzero": len(dge_modules(model))}


def test_mask_rcnn_training_forward_leaves_routing_statistics_for_after_backward(data_root):
    """With the RoutingStatsWriter hook, the training forward reads no routing statistics;
    the hook writes them after the step in one transfer."""
    from detectron2.data import build_detection_train_loader
    from detectron2.modeling import build_model

    from dge.config import load_config

    cfg = load_config("configs/demo_pvt_dge_synthetic.yaml", ["DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2])
    torch.manual_seed(1)
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    with EventStorage():
        model(batch)  # warm-up: layouts and other caches are built on first use
    reads = {}
    for defer in (False, True):
        model.defer_routing_stats = defer
        torch.manual_seed(2)  # the same Gumbel draws and samples: the same reads elsewhere
        with EventStorage() as storage:
            reads[defer] = count_host_reads(lambda: model(batch))
            written = {k for k in storage.latest() if k.startswith("dge/")}
            if defer:
                assert not written
                assert count_host_reads(model.write_routing_stats) == {"Tensor.tolist": 1}
                written = {k for k in storage.latest() if k.startswith("dge/")}
        assert {"dge/beta", "dge/beta_stage1", "dge/share_phi1"} <= written
    assert reads[False] - reads[True] == {"Tensor.tolist": 1}
    assert not reads[True] - reads[False]
