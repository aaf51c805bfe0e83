"""How a Dynamic Grained Encoder routes (``DGEOptions``): the one home of the DGE defaults."""
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["DGEOptions", "ROUTING_KINDS", "ESTIMATORS"]

ROUTING_KINDS = ("region", "layer")
ESTIMATORS = ("paper", "official", "official_sparse")  # DGEOptions.estimator


def _check_granularities(granularities: Sequence[int], region_size: Optional[int]) -> Tuple[int, ...]:
    values = tuple(sorted({int(g) for g in granularities}))
    if not values or any(g < 0 or g != int(g) for g in granularities):
        raise ValueError(f"granularities must be a non-empty set of non-negative integers; got {tuple(granularities)}")
    if max(values) == 0:
        raise ValueError(f"granularities must contain a positive granularity; got {values}")
    if region_size is not None:
        bad = [g for g in values if g > 0 and region_size % g != 0]
        if bad:
            raise ValueError(f"granularities must divide the region size {region_size}; got {bad[0]}")
    return values


@dataclass(frozen=True)
class DGEOptions:
    """How a Dynamic Grained Encoder routes: the one home of these defaults (detectron2's
    MODEL.DGE keys and the classifier's flags take theirs from here).

    Attributes:
        granularities: Φ, e.g. (1, 2, 4); 0 means "skip the region".
        region_size: S; None uses max(Φ). Every φ must divide it.
        routing: "region" (Sec. 3.2.2) or "layer" (the region is the whole map, Table 1).
        gumbel_tau: τ of the soft score (Eq. 5).
        estimator: how training passes gradients to the routers:
            "paper": only the chosen granularity is computed; the task loss reaches the router
            through the chosen choice's score (Eq. 6), the budget through ψ of the chosen
            choice (Eq. 7). "official": the official code's (vtpack) default: every
            granularity computed and mixed by the hard Gumbel-softmax straight-through gate
            over all K; the budget counts Σ_k gate_k ψ_k, so its gradient reaches every
            choice's score. "official_sparse": vtpack's ``sparse_train``: the task gradient of
            "paper", the budget gradient of "official".
        init_fine_prob: initial router probability of the finest granularity.
    """

    granularities: Tuple[int, ...] = (1, 2, 4)
    region_size: Optional[int] = None
    routing: str = "region"
    gumbel_tau: float = 1.0
    estimator: str = "paper"
    init_fine_prob: float = 0.95

    def __post_init__(self):
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing must be one of {ROUTING_KINDS}; got {self.routing!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}; got {self.estimator!r}")
        if not math.isfinite(self.gumbel_tau) or self.gumbel_tau <= 0:  # (NaN <= 0 is False)
            raise ValueError(f"gumbel_tau must be a finite number > 0; got {self.gumbel_tau}")
        if not 0.0 < self.init_fine_prob < 1.0:
            raise ValueError(f"init_fine_prob must be in (0, 1); got {self.init_fine_prob}")
        object.__setattr__(self, "granularities", _check_granularities(self.granularities, None))  # sorted
        if self.region_size is not None and self.region_size < 1:
            raise ValueError(f"region_size must be >= 1; got {self.region_size}")
        _check_granularities(self.granularities, self.region_size or max(self.granularities))

    @classmethod
    def coerce(cls, value: Union[None, bool, Mapping[str, Any], "DGEOptions"]) -> Optional["DGEOptions"]:
        """None / False: no DGE; True: the defaults; a mapping of field names or an instance."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        names = tuple(f.name for f in fields(cls))
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"unknown DGE options {unknown}; allowed: {names}")
        return cls(**value)

    @classmethod
    def from_config(cls, dge_cfg) -> "DGEOptions":
        """From detectron2's ``cfg.MODEL.DGE`` (REGION_SIZE 0 means max(Φ)); a bad value's error
        names its key (``MODEL.DGE.GUMBEL_TAU: gumbel_tau must be ...``)."""
        try:
            return cls(
                granularities=tuple(dge_cfg.GRANULARITIES),
                region_size=dge_cfg.REGION_SIZE or None,
                routing=dge_cfg.ROUTING,
                gumbel_tau=dge_cfg.GUMBEL_TAU,
                estimator=dge_cfg.ESTIMATOR,
                init_fine_prob=dge_cfg.INIT_FINE_PROB,
            )
        except ValueError as e:
            field = next((f.name for f in fields(cls) if str(e).startswith(f.name)), None)
            raise ValueError(f"MODEL.DGE.{field.upper() if field else '*'}: {e}") from e

    def replace(self, **changes) -> "DGEOptions":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return asdict(self)
