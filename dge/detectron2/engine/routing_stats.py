"""The DGE routing statistics of a training step, written after its backward, and a routing
line in the log."""
import logging
import re

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

__all__ = ["RoutingStatsWriter", "routing_line"]

logger = logging.getLogger(__name__)


def routing_line(storage: EventStorage, window: int) -> str:
    """β, β per stage and the φ shares of the training steps, medians over the last
    ``window`` iterations of ``storage`` (the ``dge/*`` scalars); "" when there are none."""
    histories = storage.histories()
    if "dge/beta" not in histories:
        return ""

    def median(key: str) -> float:
        return histories[key].median(window)

    def keys(prefix: str):
        found = [k for k in histories if k.startswith(prefix) and k[len(prefix):].isdigit()]
        return sorted(found, key=lambda k: int(re.sub(r"\D", "", k)))

    stages = " ".join(f"{median(k):.2f}" for k in keys("dge/beta_stage"))
    shares = ", ".join(f"φ={k[len('dge/share_phi'):]} {100 * median(k):.0f}%" for k in keys("dge/share_phi"))
    beta = median("dge/beta")
    return f"iter {storage.iter}: β {beta:.3f} (stages {stages}); regions {shares}; medians of {window} iterations"


class RoutingStatsWriter(HookBase):
    """Writes β, β per stage and the φ shares of each training step to the event storage
    after the step (its backward and optimizer update), in one device-to-host transfer: the
    budget-loss meta-architectures (``BudgetLossMixin``) keep them on the device until then,
    so that the forward never waits for the GPU. Every ``period`` iterations (and at the
    last) the main process logs them in one line (``routing_line``). Goes before
    detectron2's PeriodicWriter among the trainer's hooks."""

    def __init__(self, period: int = 20):
        self._period = period

    def before_train(self):
        self._models = [m for m in self.trainer.model.modules() if hasattr(m, "write_routing_stats")]
        for m in self._models:
            m.defer_routing_stats = True

    def after_step(self):
        for m in self._models:
            m.write_routing_stats()
        done = self.trainer.iter + 1
        if self._models and comm.is_main_process() and (done % self._period == 0 or done == self.trainer.max_iter):
            line = routing_line(self.trainer.storage, self._period)
            if line:
                logger.info(line)

    def after_train(self):
        for m in self._models:
            m.defer_routing_stats = False
