"""The DGE routing statistics of a training step, written after its backward."""
from detectron2.engine import HookBase

__all__ = ["RoutingStatsWriter"]


class RoutingStatsWriter(HookBase):
    """Writes β, β per stage and the φ shares of each training step to the event storage
    after the step (its backward and optimizer update), in one device-to-host transfer: the
    budget-loss meta-architectures (``BudgetLossMixin``) keep them on the device until then,
    so that the forward never waits for the GPU. Goes before detectron2's PeriodicWriter
    among the trainer's hooks."""

    def before_train(self):
        self._models = [m for m in self.trainer.model.modules() if hasattr(m, "write_routing_stats")]
        for m in self._models:
            m.defer_routing_stats = True

    def after_step(self):
        for m in self._models:
            m.write_routing_stats()

    def after_train(self):
        for m in self._models:
            m.defer_routing_stats = False
