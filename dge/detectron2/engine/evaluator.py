"""Evaluators: the routing statistics that DGE meta-architectures attach to each output, and
the evaluators of a dataset (its task's, plus those statistics) that training, evaluation and
tools/budget_curves.py use."""
import itertools
import os
from collections import OrderedDict, defaultdict

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators, SemSegEvaluator
from detectron2.utils import comm

from ..compat import coco_evaluator

__all__ = ["DGEStatsEvaluator", "build_evaluator"]


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


def build_evaluator(cfg, dataset_name: str, output_folder=None) -> DatasetEvaluators:
    """COCO (instances) or semantic-segmentation evaluation of ``dataset_name`` by its
    ``evaluator_type``, plus ``DGEStatsEvaluator``; results go to ``output_folder`` (default
    ``OUTPUT_DIR/inference/<dataset>``)."""
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type in ("coco", "coco_panoptic_seg"):
        task = coco_evaluator(dataset_name, output_dir=output_folder)
    elif evaluator_type == "sem_seg":
        task = SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)
    else:
        raise NotImplementedError(f"no evaluator for dataset {dataset_name!r} of type {evaluator_type!r}")
    return DatasetEvaluators([task, DGEStatsEvaluator()])
