"""Everything that differs between detectron2 v0.6 (pb1-detectron2, no compiled ops) and
current detectron2 built from source goes through this module, nowhere else:
compiled ops and the COCO evaluator's fast path, multi-process launch (v0.6 asserts CUDA and
NCCL; both wait 30 minutes for a missing peer), DDP of CPU models, and the local process group."""
import contextlib
import functools
import logging
import os
import time
from datetime import timedelta
from urllib.parse import urlparse

import detectron2
import torch
import torch.distributed as dist
from detectron2.utils import comm

__all__ = [
    "DETECTRON2_VERSION",
    "has_compiled_ops",
    "detectron2_description",
    "coco_evaluator",
    "launch",
    "cpu_ddp_support",
    "restart_data_iterator",
]

logger = logging.getLogger(__name__)

# (major, minor) of the installed detectron2, e.g. (0, 6).
DETECTRON2_VERSION = tuple(int(v) for v in detectron2.__version__.split(".")[:2])


@functools.lru_cache(maxsize=None)
def has_compiled_ops() -> bool:
    """True if detectron2's C++/CUDA extension is built (False for the pb1-detectron2 build,
    whose ``detectron2._C`` is the stand-in from tools/setup/detectron2_C_standin.py)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "IS_STANDIN", False)


def detectron2_description() -> str:
    ops = "compiled ops" if has_compiled_ops() else "no compiled ops"
    return f"{detectron2.__version__} ({ops})"


def coco_evaluator(dataset_name: str, output_dir=None, **kwargs):
    """COCOEvaluator on the C++ fast path when compiled, else pycocotools' official one."""
    from detectron2.evaluation import COCOEvaluator

    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=has_compiled_ops(), **kwargs)


# ---------------------------------------------------------------------------- launch
def restart_data_iterator(trainer) -> None:
    """Makes a detectron2 ``SimpleTrainer`` read its data loader from the start again (after
    the loader's position changed on resume): v0.6 creates the iterator in ``__init__``,
    current detectron2 on first use."""
    if hasattr(trainer, "_data_loader_iter_obj"):  # current detectron2
        trainer._data_loader_iter_obj = None
    else:  # v0.6
        trainer._data_loader_iter = iter(trainer.data_loader)


def launch(main_func, num_processes: int, num_machines: int = 1, machine_rank: int = 0, dist_url=None, args=()):
    """detectron2's ``launch`` with a join that gives up after ``DGE_JOIN_TIMEOUT`` seconds and
    names the ranks that did not connect: ``num_processes`` processes per machine, one per GPU
    joined by NCCL where CUDA is present, CPU processes joined by gloo otherwise (v0.6 asserts
    CUDA)."""
    world_size = num_processes * num_machines
    if world_size == 1:
        return main_func(*args)
    if torch.cuda.is_available() and num_processes > torch.cuda.device_count():
        raise ValueError(
            f"--num-gpus {num_processes} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError('dist_url="auto" is only for one machine; give tcp://HOST:PORT')
        from detectron2.engine.launch import _find_free_port

        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    torch.multiprocessing.start_processes(
        _worker,
        nprocs=num_processes,
        args=(main_func, world_size, num_processes, machine_rank, dist_url, args),
        daemon=False,
        start_method="spawn",
    )


JOIN_TIMEOUT_S = 300.0  # default wait for every process to join (env DGE_JOIN_TIMEOUT, seconds)
_JOINED = "dge/joined/{}"


def _join(dist_url: str, world_size: int, rank: int, num_per_machine: int, backend: str) -> None:
    """Process group through a TCP store: every rank registers, and each waits
    ``DGE_JOIN_TIMEOUT`` seconds for the others before it stops with the ranks still missing
    (collectives keep detectron2's 30 minutes)."""
    timeout = float(os.environ.get("DGE_JOIN_TIMEOUT", JOIN_TIMEOUT_S))
    url = urlparse(dist_url)
    if url.scheme != "tcp" or not url.hostname or not url.port:
        raise ValueError(f"--dist-url must be tcp://HOST:PORT; got {dist_url!r}")
    hint = (
        "Start train_net.py on every machine with the same --dist-url, --num-machines and --num-gpus "
        "and its own --machine-rank (DGE_JOIN_TIMEOUT sets the wait)."
    )
    deadline = time.monotonic() + timeout
    try:
        store = dist.TCPStore(
            url.hostname, url.port, None, is_master=rank == 0,
            timeout=timedelta(seconds=timeout), wait_for_workers=False,
        )
    except Exception as e:  # DistStoreError / RuntimeError: rank 0's store is not reachable
        raise RuntimeError(
            f"rank {rank}: could not reach rank 0 (machine 0) at {dist_url} within {timeout:.0f} s. "
            f"{hint} ({type(e).__name__}: {e})"
        ) from None
    store.set(_JOINED.format(rank), str(rank // num_per_machine))
    missing, lost = list(range(world_size)), None
    while True:
        try:
            missing = [r for r in missing if not store.check([_JOINED.format(r)])]
        except Exception as e:  # rank 0 gave up waiting and its store went away
            lost = f" (rank 0's store closed: {type(e).__name__})"
            break
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if missing:
        machines = sorted({r // num_per_machine for r in missing})
        raise RuntimeError(
            f"rank {rank}: not all {world_size} processes joined {dist_url} within {timeout:.0f} s; "
            f"missing rank(s) {_ranges(missing)} (machine(s) {machines}){lost or ''}. {hint}"
        )
    dist.init_process_group(
        backend=backend, store=store, world_size=world_size, rank=rank, timeout=timedelta(minutes=30)
    )


def _ranges(ranks) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def _worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    global_rank = machine_rank * num_per_machine + local_rank
    has_gpu = torch.cuda.is_available()
    if has_gpu:
        torch.cuda.set_device(local_rank)
    _join(dist_url, world_size, global_rank, num_per_machine, "nccl" if has_gpu else "gloo")
    _set_local_process_group(num_per_machine, machine_rank, world_size)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _set_local_process_group(num_per_machine: int, machine_rank: int, world_size: int) -> None:
    if hasattr(comm, "create_local_process_group"):  # current detectron2
        comm.create_local_process_group(num_per_machine)
        return
    for i in range(world_size // num_per_machine):  # v0.6
        group = dist.new_group(list(range(i * num_per_machine, (i + 1) * num_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group


@contextlib.contextmanager
def cpu_ddp_support():
    """While active, detectron2's ``create_ddp_model`` wraps CPU models in DDP without
    ``device_ids`` (both v0.6 and current detectron2 pass the local rank as a CUDA device)."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original
