"""tools/device_check.sh starts on any machine: without a CUDA device it says so and stops."""
import os
import subprocess
import sys

import pytest
import torch
from repo import ROOT



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


def test_device_check_steps_run_on_the_cpu(capsys):
    """The Python steps of the GPU check, as its CPU dry run runs them: host syncs per block
    (every case one nonzero) and varlen vs padded (the padded path against float64)."""
    import device_check

    device_check.main(["syncs", "--device", "cpu"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8 and all(row[-1] == "ok |" for row in rows), rows
    device_check.main(["varlen", "--device", "cpu"])
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].startswith("| varlen vs padded | padded fp32 vs fp64 alone |") and rows[0].endswith("| ok |")


def test_device_check_reads_pytest_and_train_net_logs(tmp_path):
    from dge.analysis.gpu_checks import pytest_row, train_row

    log = tmp_path / "pytest.log"
    log.write_text("....F\n==== 1 failed, 19 passed, 2 skipped in 9.1s ====\n")
    assert pytest_row(str(log))[2:] == ("1 failed, 19 passed, 2 skipped in 9.1s", "FAIL")
    log.write_text("20 passed in 3.2s\n")
    assert pytest_row(str(log))[3] == "ok"
    train = tmp_path / "train.log"
    lines = [
        "[12/04 19:01:40 d2.utils.events]:  eta: 0:00:01  iter: 19  total_loss: 3.9  loss_cls: 0.5",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: Task: bbox",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: 1.2000,3.4000,0.0000,0.0000,0.0198,0.0000",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: Task: routing",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: beta,beta_stage1",
        "[12/04 19:01:48 d2.evaluation.testing]: copypaste: 0.9500,1.0000",
    ]
    train.write_text("\n".join(lines) + "\n")
    row = train_row(str(train), 20)
    assert row[2] == "iter 19, total_loss 3.9; evaluation: box AP/AP50 1.2000/3.4000, β 0.9500" and row[3] == "ok"
    assert train_row(str(train), 40)[3] == "FAIL"  # stopped early
