"""Files written in one rename: a crash or a full disk leaves the previous file whole and no
temporary file; an error names the file and the cause. One run per output folder
(``take_run_lock``)."""
import atexit
import logging
import os
import socket

import torch

__all__ = ["RUN_LOCK", "atomic_save", "atomic_write_text", "take_run_lock"]

RUN_LOCK = "dge_run.lock"  # in a run's output folder: "<host> <pid>" of the process that runs there
logger = logging.getLogger(__name__)


def _first_os_error(error: BaseException):
    """The first OSError in ``error``'s chain (torch.save reports a full disk as a RuntimeError
    whose cause is the OSError), or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _atomic_write(path: str, mode: str, write) -> None:
    """``write(f)`` into ``path + ".tmp"``, flushed to disk, then renamed over ``path``; on any
    failure (disk full, interrupted) the temporary file is removed and ``path`` is untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # no partial file stays behind to fill the disk
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = _first_os_error(e)
        if cause is not None:
            raise OSError(cause.errno, f"could not write {path}: {cause.strerror or cause}") from e
        raise


def atomic_save(obj, path: str) -> None:
    """``torch.save`` of ``obj`` to ``path`` in one rename: a crash leaves the previous file whole."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    """``path`` replaced by ``text`` in one rename (readers see the old or the new file)."""
    _atomic_write(path, "w", lambda f: f.write(text))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _release(path: str, holder: str) -> None:
    try:
        with open(path) as f:
            if f.read() == holder:
                os.remove(path)
    except OSError:
        pass


def take_run_lock(folder: str) -> str:
    """Marks ``folder`` as this process's run folder (``folder/dge_run.lock``: host and pid),
    released when the process exits; returns the lock's path. A lock of another live process
    stops this one with that process's host and pid; a lock left on this host by a process
    that is gone (a killed run) is taken over, with a warning. Taking it again is a no-op."""
    os.makedirs(folder, exist_ok=True)
    path, host = os.path.join(folder, RUN_LOCK), socket.gethostname()
    me = f"{host} {os.getpid()}"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                holder = f.read()
            if holder == me:
                return path
            other_host, _, pid = holder.partition(" ")
            if other_host == host and pid.isdigit() and not _process_alive(int(pid)):
                logger.warning(f"{folder}: taking over the run lock of process {pid}, which is gone (a stopped run)")
                os.remove(path)
                continue
            raise RuntimeError(
                f"{folder} is in use by process {pid or '?'} on {other_host or '?'} ({path}): give this run another "
                f"OUTPUT_DIR, or remove {path} if that run is gone"
            )
        with os.fdopen(fd, "w") as f:
            f.write(me)
        atexit.register(_release, path, me)
        return path
