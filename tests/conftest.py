"""Shared fixtures: the repo root (train_net.py), tools/ and tests/helpers/ on sys.path, and a small
synthetic dataset. The tests' folders follow the package's: tests/layers/ holds the tests of
dge/layers/, and so on (pytest imports them with --import-mode=importlib: pytest.ini)."""
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train_net.py
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the tools' main()s
sys.path.insert(0, os.path.join(ROOT, "tests", "helpers"))  # model_helpers, train_helpers, repo

from repo import SMALL_DATA  # noqa: E402  (tests/helpers/, on sys.path from here on)

# Under pytest-xdist (``make test``: one worker per core) each worker and the processes its
# tests start compute on one thread: workers side by side instead of threads fighting for cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_data_folder(tmp_path_factory):
    """Where the session's small dge_synthetic_* datasets live (generated on first use)."""
    return str(tmp_path_factory.mktemp("datasets") / "dge_synthetic")


@pytest.fixture(scope="session")
def data_root(small_data_folder):
    """Registers the dge_synthetic_* datasets at a small size under a session temp folder. A
    test that registers others puts these back when it ends (test_synthetic_data)."""
    from dge.detectron2.data import register_synthetic_datasets

    register_synthetic_datasets(root=small_data_folder, **SMALL_DATA)
    yield small_data_folder
    register_synthetic_datasets()  # back to the default root


@pytest.fixture
def one_thread():
    """Tiny models: one torch thread is fastest and keeps runs steady on shared machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def dge_logs_reach_caplog(caplog):
    """The dge logger's lines reach pytest's caplog through a handler on the dge logger itself:
    train_net.py and the tools set it up as detectron2 sets up its own (propagation off, the
    first time in a process only), so propagation to the root logger depends on test order."""
    logger = logging.getLogger("dge")
    propagate = logger.propagate
    logger.propagate = False  # each line once, whether or not a tool set the logger up
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)
    logger.propagate = propagate
