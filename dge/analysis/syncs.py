"""Host reads of tensor values during a call: on a GPU each one waits for the device (a sync),
and a tensor made from host data is a blocking host-to-device copy.

The CPU profiler sees only some of them (``aten::nonzero``, ``aten::_local_scalar_dense``
for ``.item()`` / ``bool(t)`` / ``int(t)``); ``.tolist()`` and ``new_tensor([...])`` dispatch
no aten op there. ``count_host_reads`` counts both kinds on any device: the profiler's ops,
and Python-level calls of the ``Tensor`` methods and ``torch`` functions that read or take
host data, each wrapped while the call runs. On a CUDA device ``count_cuda_syncs`` counts
what CUDA itself reports (``torch.cuda.set_sync_debug_mode``).
"""
import contextlib
import functools
import warnings
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["HOST_READ_METHODS", "HOST_DATA_FUNCTIONS", "count_host_reads", "count_cuda_syncs"]

# Tensor methods that read a value on the host, or (new_tensor) copy host data to the tensor's device.
HOST_READ_METHODS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "new_tensor")
# torch functions that make a tensor from host data.
HOST_DATA_FUNCTIONS = ("tensor", "as_tensor")
PROFILED_READS = ("aten::nonzero", "aten::_local_scalar_dense")


def _counted(counter: Counter, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        counter[name] += 1
        return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _wrapped_host_reads(counter: Counter) -> Iterator[None]:
    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in HOST_READ_METHODS]
    saved += [(torch, name, getattr(torch, name)) for name in HOST_DATA_FUNCTIONS]
    label = {torch.Tensor: "Tensor.", torch: "torch."}
    for owner, name, fn in saved:
        setattr(owner, name, _counted(counter, label[owner] + name, fn))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def count_host_reads(fn: Callable[[], object]) -> Counter:
    """Runs ``fn()`` and counts its host reads by kind: ``aten::nonzero`` and
    ``aten::_local_scalar_dense`` (profiler), ``Tensor.item`` ... ``torch.tensor`` (wrapped
    calls; a wrapped call that reads through an aten op is counted under both names). An
    empty Counter: ``fn`` never waits for the device and copies nothing from the host."""
    counter: Counter = Counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof, _wrapped_host_reads(counter):
        fn()
    counter.update(event.name for event in prof.events() if event.name in PROFILED_READS)
    return counter


def count_cuda_syncs(fn: Callable[[], object]) -> int:
    """Runs ``fn()`` with ``torch.cuda.set_sync_debug_mode("warn")`` and returns the number of
    synchronizing CUDA calls it made (each is a warning)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)
