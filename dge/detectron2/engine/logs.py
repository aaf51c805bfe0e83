"""dge's log lines where detectron2's go, one set-up for train_net.py and every tool; and how
a tool ends on bad input."""
import logging
import sys
from typing import Callable, Optional, Sequence

from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

__all__ = ["run_tool", "setup_dge_logger"]


def setup_dge_logger(output: Optional[str] = None, also: Sequence[str] = ()) -> logging.Logger:
    """Sets up the ``dge`` logger (and the loggers named in ``also``, e.g. "detectron2") with
    detectron2's ``setup_logger``: its format, the console on the main process only, and
    ``output`` (a folder: ``output/log.txt``, ``log.txt.rank{N}`` for other processes; or
    a file) for every process. Repeated calls with the same arguments add nothing."""
    rank = comm.get_rank()
    for name in tuple(also):
        setup_logger(output, distributed_rank=rank, name=name)
    return setup_logger(output, distributed_rank=rank, name="dge")


def run_tool(main: Callable[[], object]) -> None:
    """Runs a tool's ``main()``; bad input (FileNotFoundError, ValueError) ends the process with
    status 1 and one line, ``error: <message>``, instead of a traceback."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
