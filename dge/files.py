"""Files written in one rename: a crash or a full disk leaves the previous file whole and no
temporary file; an error names the file and the cause."""
import os

import torch

__all__ = ["atomic_save", "atomic_write_text"]


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
