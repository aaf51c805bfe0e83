"""tools/device_check.sh starts on any machine: without a CUDA device it says so and stops."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script would measure it")
def test_device_check_says_no_gpu(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "tools", "device_check.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no CUDA GPU present" in done.stdout
    assert "1/4" not in done.stdout  # stopped before measuring
