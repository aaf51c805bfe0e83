#!/usr/bin/env python
"""The steps of tools/device_check.sh that are Python, one per call, each printing its rows of
the check table (``| check | case | measured | verdict |``); the library is
``dge.analysis.gpu_checks``.

    python tools/device_check.py env --device cuda        # versions, GPU, attention kernels
    python tools/device_check.py varlen --device cuda     # 1: varlen vs padded, outputs and gradients
    python tools/device_check.py plans --device cuda      # 2: time over 20 query counts, memory
    python tools/device_check.py syncs --device cuda      # 3: host syncs per DGE block
    python tools/device_check.py latency OUT_DIR          # 4-5: rows of tools/benchmark.py's JSON files
    python tools/device_check.py tests LOG                # 6: the pytest summary
    python tools/device_check.py train LOG ITERATIONS     # 7: train_net.py's last iteration and AP
"""
import argparse

import torch

from dge.analysis import gpu_checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["env", "varlen", "plans", "syncs", "latency", "tests", "train"])
    parser.add_argument("paths", nargs="*", help="latency: the output folder; tests: the log; train: the log, iterations")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tokens", type=int, nargs=2, default=[200, 320], help="plans: the token map (H W)")
    args = parser.parse_args(argv)
    if args.step in ("env", "varlen", "plans", "syncs") and args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (DEVICE_CHECK_DEVICE=cpu for a dry run)")
    if args.step == "env":
        for name, value in gpu_checks.environment(args.device):
            print(f"[device_check] {name}: {value}")
        return
    if args.step == "latency":
        print("\n".join(gpu_checks.latency_rows(args.paths[0])))
        return
    rows = {
        "varlen": lambda: gpu_checks.varlen_rows(args.device),
        "plans": lambda: gpu_checks.plan_rows(args.device, tuple(args.tokens)),
        "syncs": lambda: gpu_checks.sync_rows(args.device),
        "tests": lambda: [gpu_checks.pytest_row(args.paths[0])],
        "train": lambda: [gpu_checks.train_row(args.paths[0], int(args.paths[1]))],
    }[args.step]()
    print(gpu_checks.markdown(rows), flush=True)


if __name__ == "__main__":
    main()
