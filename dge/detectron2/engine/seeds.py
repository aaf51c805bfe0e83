"""Random state per training step, derived from (seed, rank, iteration)."""
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.loader import step_seed

__all__ = ["StepSeeds"]


class StepSeeds(HookBase):
    """Before each step, seeds torch (CPU and every CUDA device), numpy and Python's random
    from (seed, rank, iteration): the Gumbel noise, dropout and drop-path draws of step i are
    the same in an uninterrupted and a resumed run, on every rank, with no RNG state to save.
    ``seed`` is read from ``trainer.data_seed`` (kept in the checkpoint)."""

    def before_step(self):
        seed_all_rng(step_seed(self.trainer.data_seed, comm.get_rank(), self.trainer.iter))
