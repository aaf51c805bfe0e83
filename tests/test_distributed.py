"""Distributed start on CPU processes: a missing peer is named after a configurable wait."""
import pytest


def _never_called():
    raise AssertionError("the process group should not have formed")


def test_a_missing_peer_machine_is_named_after_the_join_timeout(monkeypatch):
    from detectron2.engine.launch import _find_free_port

    from dge.compat import launch

    monkeypatch.setenv("DGE_JOIN_TIMEOUT", "3")
    url = f"tcp://127.0.0.1:{_find_free_port()}"
    with pytest.raises(Exception, match=r"not all 2 processes joined .* within 3 s; the processes of machine\(s\) \[1\]"):
        launch(_never_called, 1, num_machines=2, machine_rank=0, dist_url=url)
