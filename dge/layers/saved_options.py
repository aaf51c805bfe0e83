"""The DGE options a block's router weights depend on (Φ, region size, routing kind), kept in
the model's own state so that every loader checks them.

Each DGE block stores them as its ``_extra_state`` (``get_extra_state``): one int64 tensor of
fixed length, so detectron2's and fvcore's checkpointers (which expect tensors of matching
shapes) save and load it like any buffer. Loading weights whose router was trained under
other options stops with both option sets named, whoever loads (``load_state_dict``,
detectron2's ``DetectionCheckpointer`` and ``DefaultPredictor``, timm's ``load_checkpoint``);
``allow_other_options()`` loads them anyway and keeps this model's routers. A file without
the entry (written before it existed) loads with one line that says so.
"""
import contextlib
import contextvars
import logging
from collections import OrderedDict
from typing import Dict, Iterator, List, MutableMapping, Optional, Sequence, Set, Tuple

import torch

from .keys import OPTIONS_STATE, ROUTER_STATE
from .options import ROUTING_KINDS

__all__ = ["allow_other_options", "check_loaded_options", "describe_options", "encode_options"]

logger = logging.getLogger(__name__)

_FORMAT = 1  # first entry of the tensor: its layout, [format, routing kind (index in ROUTING_KINDS), region
# size, |Φ|, Φ..., -1 ...]
_LENGTH = 16  # entries: one shape for every Φ, so checkpointers that skip other shapes still compare
_allowed = contextvars.ContextVar("dge_other_options_allowed", default=False)
_LOADS: "OrderedDict[int, Tuple[List[str], Set[str]]]" = OrderedDict()  # recent loads -> what they said


def encode_options(granularities: Sequence[int], region_size: int, routing: str) -> torch.Tensor:
    """The options as the int64 tensor a DGE block stores (``_LENGTH`` entries)."""
    head = [_FORMAT, ROUTING_KINDS.index(routing), int(region_size), len(granularities)]
    head += [int(g) for g in granularities]
    if len(head) > _LENGTH:
        raise ValueError(f"at most {_LENGTH - 4} granularities can be saved; got {tuple(granularities)}")
    return torch.tensor(head + [-1] * (_LENGTH - len(head)), dtype=torch.int64)


def _decode(saved) -> Optional[Dict]:
    """The options of a stored tensor; None for anything this code did not write."""
    if not torch.is_tensor(saved) or saved.dim() != 1 or saved.numel() < 4:
        return None
    values: List[int] = saved.tolist()
    if values[0] != _FORMAT or not 0 <= values[1] < len(ROUTING_KINDS) or values[3] > len(values) - 4:
        return None
    return {"granularities": values[4:4 + values[3]], "region_size": values[2], "routing": ROUTING_KINDS[values[1]]}


def describe_options(options: Optional[Dict]) -> str:
    if options is None:
        return "options this version cannot read"
    return (f"granularities {options['granularities']}, region size {options['region_size']}, "
            f"routing {options['routing']!r}")


@contextlib.contextmanager
def allow_other_options(allowed: bool = True) -> Iterator[None]:
    """While active (and ``allowed``: e.g. MODEL.ALLOW_PARTIAL_WEIGHTS), weights whose DGE
    options differ from the model's load: every tensor but the routers', which keep this
    model's values (a warning names both option sets). Not ``allowed``: no change."""
    if not allowed:
        yield
        return
    token = _allowed.set(True)
    try:
        yield
    finally:
        _allowed.reset(token)


def _once(load_errors: List[str], message: str) -> bool:
    """Whether ``message`` is new for this load. ``load_state_dict`` hands every module the
    same ``error_msgs`` list, so the list names the load (the last few are remembered)."""
    entry = _LOADS.get(id(load_errors))
    if entry is None:
        entry = _LOADS[id(load_errors)] = (load_errors, set())  # holding the list keeps its id unique
        while len(_LOADS) > 8:
            _LOADS.popitem(last=False)
    if message in entry[1]:
        return False
    entry[1].add(message)
    return True


def check_loaded_options(
    state_dict: MutableMapping[str, torch.Tensor],
    prefix: str,
    here: torch.Tensor,
    own_router: Dict[str, torch.Tensor],
    error_msgs: List[str],
) -> None:
    """For a DGE block's ``_load_from_state_dict`` (``prefix``, its options ``here`` and its
    router's state ``own_router`` named with ``prefix``): the file's options against the
    block's. Other options add one message per distinct pair to ``error_msgs``, which
    ``load_state_dict`` raises, strict or not; under ``allow_other_options()`` the file's
    router tensors are replaced by ``own_router``'s and a warning is logged instead. A file
    with router weights but no options is said once per load. Leaves this block's options
    in ``state_dict``."""
    key = prefix + OPTIONS_STATE
    saved = state_dict.get(key)
    state_dict[key] = here  # never missing, never overwritten: the block's options are its own
    if saved is None:
        routers = [k for k in state_dict if k.startswith(prefix + "router.") and not k.endswith(ROUTER_STATE)]
        if routers and _once(error_msgs, "no options"):
            logger.warning(f"these weights carry no DGE options (saved before dge stored them): their routers "
                           f"(e.g. {routers[0]}) load unchecked against this model's {describe_options(_decode(here))}")
        return
    if torch.is_tensor(saved) and saved.shape == here.shape and torch.equal(saved.cpu(), here):
        return
    pair = f"the weights were trained with DGE {describe_options(_decode(saved))}; this model has " \
           f"{describe_options(_decode(here))}"
    if _allowed.get():
        for k in [k for k in state_dict if k.startswith(prefix + "router.")]:
            del state_dict[k]
        state_dict.update(own_router)
        if _once(error_msgs, pair):
            logger.warning(f"{pair}: loading all but the routers, which keep this model's weights "
                           "(other options allowed)")
    elif _once(error_msgs, pair):
        error_msgs.append(
            f"{pair} (first at {prefix.rstrip('.') or 'the model'}): its routers would route differently. "
            "Set the model's options as the weights have them (detectron2: MODEL.DGE.GRANULARITIES / "
            "REGION_SIZE / ROUTING), or load inside "
            "`with dge.allow_other_options():` (train_net.py and dge's tools: MODEL.ALLOW_PARTIAL_WEIGHTS True) to "
            "keep this model's routers"
        )
