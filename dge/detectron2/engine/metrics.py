"""``metrics.json`` that always holds whole lines: detectron2's JSONWriter with a file whose
writes are collected until ``flush`` and appended in one go, rolled back (truncated to the
previous size) when the append fails, e.g. on a full disk."""
import os

from detectron2.utils.events import JSONWriter

__all__ = ["WholeLinesJSONWriter"]


class _WholeLinesFile:
    """The part of a text file JSONWriter uses (write, flush, fileno, close)."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.pending = []

    def write(self, text: str) -> None:
        self.pending.append(text)

    def flush(self) -> None:
        data = memoryview("".join(self.pending).encode())
        self.pending.clear()
        if not data:
            return
        size = os.fstat(self.fd).st_size
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            os.ftruncate(self.fd, size)  # no half-written line stays behind
            raise

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        try:
            self.flush()
        finally:
            os.close(self.fd)


class WholeLinesJSONWriter(JSONWriter):
    """detectron2's JSONWriter (same lines, same smoothing) on a ``_WholeLinesFile``."""

    def __init__(self, json_file: str, window_size: int = 20):
        super().__init__(json_file, window_size)
        self._file_handle.close()
        self._file_handle = _WholeLinesFile(json_file)
