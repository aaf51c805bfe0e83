"""Shared fixtures: the repo root on sys.path (train_net.py) and a small synthetic dataset."""
import logging
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # train_net.py
sys.path.insert(0, os.path.join(ROOT, "tools"))  # the tools' main()s

# Small enough for CPU training tests: 12 train / 4 val images of 128×160.
SMALL_DATA = dict(num_train=12, num_val=4, image_size=(128, 160))


@pytest.fixture(scope="session")
def small_data_folder(tmp_path_factory):
    """Where the session's small dge_synthetic_* datasets live (generated on first use)."""
    return str(tmp_path_factory.mktemp("datasets") / "dge_synthetic")


@pytest.fixture(scope="session")
def data_root(small_data_folder):
    """Registers the dge_synthetic_* datasets at a small size under a session temp folder. A
    test that registers others puts these back when it ends (test_synthetic_data)."""
    from dge.data import register_synthetic_datasets

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
def dge_logs_reach_caplog():
    """train_net.py and the tools set up the dge logger as detectron2 sets up its own (its own
    handlers, propagate off); tests read its lines with pytest's caplog, on the root logger."""
    logging.getLogger("dge").propagate = True
    yield
