"""Print the environment dge runs in: ``python -m dge.collect_env [--short]``."""
import argparse
import os
import platform
import sys

import torch


def collect_env() -> list:
    """Returns [(name, value)] rows describing the software and devices."""
    import fvcore
    import timm
    import torchvision

    from dge.detectron2.compat import detectron2_description

    try:
        fvcore_version = fvcore.__version__
    except AttributeError:
        from importlib.metadata import version

        fvcore_version = version("fvcore")
    rows = [
        ("Python", sys.version.split()[0] + " " + platform.machine()),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
        ("detectron2", detectron2_description()),
        ("fvcore", fvcore_version),
        ("timm", timm.__version__),
        ("CPU threads (torch)", str(torch.get_num_threads())),
        ("CPU cores (os)", str(os.cpu_count())),
    ]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        rows.append(("CUDA devices", ", ".join(names) + f" (CUDA {torch.version.cuda})"))
    else:
        rows.append(("CUDA devices", "none"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="one line")
    args = parser.parse_args()
    rows = collect_env()
    if args.short:
        keep = ("torch", "torchvision", "detectron2", "CUDA devices")
        print(" | ".join(f"{k} {v}" for k, v in rows if k in keep))
        return
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
