"""Averages the DGE routing statistics that DGE meta-architectures attach to each output."""
import itertools
from collections import OrderedDict, defaultdict

from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["DGEStatsEvaluator"]


class DGEStatsEvaluator(DatasetEvaluator):
    """Mean of ``output["dge"]`` (β, β per stage, shares of granularities) over a dataset.

    Results appear as ``{"routing": {"beta": ..., "beta_stage1": ..., "share_phi1": ...}}`` and,
    through detectron2's EvalHook, as ``routing/beta`` ... in the metrics and TensorBoard
    (training writes ``dge/beta`` ...).
    """

    def __init__(self, distributed: bool = True):
        self._distributed = distributed
        self.reset()

    def reset(self):
        self._values = []

    def process(self, inputs, outputs):
        self._values.extend({k: float(v) for k, v in out["dge"].items()} for out in outputs if "dge" in out)

    def evaluate(self):
        values = self._values
        if self._distributed:
            comm.synchronize()
            values = list(itertools.chain(*comm.gather(values, dst=0)))
            if not comm.is_main_process():
                return {}
        if not values:
            return {}
        sums = defaultdict(float)
        for v in values:
            for k, x in v.items():
                sums[k] += x
        return OrderedDict(routing={k: s / len(values) for k, s in sums.items()})
