"""A checkpoint write that fails (disk full) leaves no temporary file and the previous
checkpoint and ``last_checkpoint`` as they were; ``last_checkpoint`` is replaced by a rename."""
import errno
import os

import pytest
import torch

from dge.engine import AtomicCheckpointer
from dge.engine import checkpoint as checkpoint_module


def test_disk_full_leaves_no_temporary_file_and_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    ckpt.save("model_0000")

    def full(obj, f, *a, **k):
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0001")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000.pth"


def test_last_checkpoint_is_replaced_by_a_rename(tmp_path, monkeypatch):
    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    ckpt.save("model_0000")
    replaced = []
    real = os.replace
    monkeypatch.setattr(checkpoint_module.os, "replace", lambda a, b: (replaced.append(os.path.basename(b)), real(a, b)))
    ckpt.save("model_0001")
    assert replaced == ["model_0001.pth", "last_checkpoint"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0001.pth"
