"""Distributed start: a missing peer is named after a configurable wait (the same join serves
gloo on CPUs and NCCL on GPUs; only the backend differs)."""
import time

import pytest
from detectron2.engine.launch import _find_free_port

from dge.detectron2.compat import _ranges, launch


def _never_called():
    raise AssertionError("the process group should not have formed")


def _url():
    return f"tcp://127.0.0.1:{_find_free_port()}"


def test_a_missing_peer_machine_is_named_after_the_join_timeout(monkeypatch):
    monkeypatch.setenv("DGE_JOIN_TIMEOUT", "3")
    url = _url()
    start = time.monotonic()
    with pytest.raises(Exception, match=rf"not all 4 processes joined {url} within 3 s; missing rank\(s\) 2-3 \(machine\(s\) \[1\]\)"):
        launch(_never_called, 2, num_machines=2, machine_rank=0, dist_url=url)
    assert time.monotonic() - start < 30


def test_a_machine_whose_rank_0_never_starts_says_so(monkeypatch):
    monkeypatch.setenv("DGE_JOIN_TIMEOUT", "3")
    url = _url()
    with pytest.raises(Exception, match=rf"rank 1: could not reach rank 0 \(machine 0\) at {url} within 3 s"):
        launch(_never_called, 1, num_machines=2, machine_rank=1, dist_url=url)


def test_rank_ranges_read_as_intervals():
    assert _ranges([0, 1, 2, 5]) == "0-2, 5"
    assert _ranges([3]) == "3"
    assert _ranges([1, 3, 4]) == "1, 3-4"


def test_bad_urls_and_gpu_counts_are_refused(monkeypatch):
    import torch

    with pytest.raises(ValueError, match="only for one machine"):
        launch(_never_called, 1, num_machines=2, dist_url="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="--num-gpus 2 but this machine has 1 CUDA device"):
        launch(_never_called, 2, dist_url="auto")
