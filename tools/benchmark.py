#!/usr/bin/env python
"""Latency of a DGE model against its vanilla twin: same weights (but the routers), same
inputs, one process, interleaved runs.

    .venv/bin/python tools/benchmark.py --config-file configs/mask_rcnn_pvt_s_dge_1x.yaml \
        --sizes 800x1280 --batch 1 --target-beta 0.5 --what backbone model train --json out.json

For each input size and batch: warm-up, then ``--runs`` interleaved runs of vanilla and DGE;
the median, min and max (ms), the ratio of medians, the β measured on those inputs, threads
and device. ``backbone``: the bottom-up backbone at inference; ``model``: the whole
detectron2 model (``MODEL.META_ARCHITECTURE``) at inference; ``train``: one training step of
the backbone (forward, a scalar loss + the budget loss, backward, AdamW step).
``--processes N`` repeats all of it in N fresh processes and reports each ratio's median
and range: on a 2-core CPU the DGE latency differs between processes by up to 10% (glibc's
allocation thresholds), so one process is not enough for a claim.

Untrained routers give every region the same choice. Unless ``MODEL.WEIGHTS`` holds trained
routers, the tool re-initialises each router's weights (std 1/√C) so that regions differ,
then calibrates an offset of the finest choice's logit until β on the inputs reaches
``--target-beta`` (bisection); it says so in the output. ``--calibration shared`` (default):
one offset for all routers, on the model's β: where the budget is spent (which stage) is
left to the random routers. ``--calibration per-block``: one offset per router, each on its
own block's β, so that every block runs at the target. Latency depends on that choice,
because a FLOP costs more time in some stages than in others (e.g. DPVT's stage 1). Inputs
are the real photographs scikit-image ships, resized to each size.
"""
import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import torch

import dge  # noqa: F401
from dge.analysis.calibration import calibrate, set_logit_offset
from dge.analysis.latency import (
    PRECISIONS,
    RUNTIMES,
    build_models,
    case_functions,
    device_sync,
    largest_difference,
    normalise,
    photos,
    precision_check,
    read_status_mb,
    reset_peak_rss,
    timed_interleaved,
    with_precision,
)
from dge.config import load_config
from dge.layers import complexity_report, record_routing


def cpu_peak_memory_mb(argv, what: str, variant: str, offset) -> dict:
    """Peak resident memory (MB) while ``what`` runs once, in a fresh process that builds
    ``variant`` alone (RSS peaks are per process, and forking after OpenMP can deadlock):
    {"peak_rss_mb", "rss_increase_mb"} (the peak minus the resident memory just before the
    first run: weights, inputs and the process are in both; first-call workspaces are in the
    increase), or the process's lifetime peak when the peak cannot be reset (then it includes
    building the models)."""
    cmd = [sys.executable, __file__, *argv, "--memory-case", what, variant]
    if offset is not None:
        cmd += ["--logit-offset", *map(str, offset)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/mask_rcnn_pvt_s_dge_1x.yaml")
    parser.add_argument("--sizes", nargs="+", default=["800x1280"], help="HxW input sizes")
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--what", nargs="+", default=["backbone"], choices=["backbone", "model", "train"])
    parser.add_argument(
        "--runtime", default="eager", choices=RUNTIMES,
        help="backbone in eager PyTorch, as a torch.export program, in onnxruntime, or torch.compile'd",
    )
    parser.add_argument(
        "--precision", default="fp32", choices=list(PRECISIONS),
        help="run every case under torch.autocast in this dtype (training: AMP); fp32: no autocast",
    )
    parser.add_argument("--target-beta", type=float, default=0.5)
    parser.add_argument(
        "--calibration", default="shared", choices=["shared", "per-block"],
        help="untrained routers: one logit offset for all routers (on the model's β) or one per block",
    )
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also measure peak memory per case")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--processes", type=int, default=1,
        help="repeat everything in N fresh processes; report each ratio's median and range "
        "(on a CPU, latency differs between processes by a few percent)",
    )
    # Internal: one case in a fresh process, for --memory on the CPU.
    parser.add_argument("--memory-case", nargs=2, metavar=("WHAT", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--logit-offset", type=float, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1; got {args.processes}")
    if args.processes > 1 and not args.memory_case:
        return repeat_in_processes(args, list(sys.argv[1:] if argv is None else argv))

    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DGE.ENABLED = True
    device = torch.device(cfg.MODEL.DEVICE)
    sync = device_sync(device)
    if args.memory_case:
        return memory_case(args, cfg, device)
    models, trained = build_models(cfg)
    dge_model = models["dge"]
    results = {
        "config": args.config_file,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "routers": "trained (MODEL.WEIGHTS)"
        if trained
        else f"untrained: weights re-initialised, finest-logit offsets calibrated to the target β ({args.calibration})",
        "cases": [],
    }
    applied = [0.0]  # logit offsets currently added to the routers
    for size in args.sizes:
        hw = tuple(int(v) for v in size.lower().split("x"))
        for batch in args.batch:
            images = photos(batch, hw, device)
            x = normalise(dge_model, images)
            inputs = [{"image": img, "height": hw[0], "width": hw[1]} for img in images]
            offset = None
            with torch.inference_mode():
                if not trained:
                    set_logit_offset(dge_model, [-a for a in applied])  # each input calibrates from the start
                    offset, _ = calibrate(
                        dge_model,
                        lambda: dge_model.backbone.bottom_up(x),
                        args.target_beta,
                        per_block=args.calibration == "per-block",
                    )
                    applied = offset
                with record_routing() as record:
                    dge_model.backbone.bottom_up(x)
                report = complexity_report(record, dge_model)
                beta = report.beta.mean().item()
            case = {
                "size": list(hw),
                "batch": batch,
                "beta": round(beta, 4),
                "beta_per_image": [round(b, 4) for b in report.beta.tolist()],
                "beta_per_block": [round(b, 4) for b in report.layer_beta.mean(dim=1).tolist()],
            }
            if offset is not None:
                case["calibrated_logit_offsets"] = [round(o, 3) for o in offset]
            per_image = "" if batch == 1 else "; per image " + ", ".join(f"{b:.2f}" for b in case["beta_per_image"])
            for what in args.what:
                with tempfile.TemporaryDirectory() as workdir:
                    with torch.no_grad():
                        cases = case_functions(what, models, x, inputs, cfg.MODEL.DGE.BUDGET, args.runtime, workdir)
                    cases = {k: with_precision(fn, device, args.precision) for k, fn in cases.items()}
                    grad = torch.enable_grad if what == "train" else torch.inference_mode
                    with grad():
                        samples = timed_interleaved(cases, args.runs, args.warmup, sync)
                    row = {
                        k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "max_ms": round(max(v), 2)}
                        for k, v in samples.items()
                    }
                    if args.runtime != "eager":
                        with torch.inference_mode():
                            for k, fn in cases.items():
                                row[k]["max_abs_diff_to_eager"] = largest_difference(fn, models[k].backbone.bottom_up, x)
                if args.memory:
                    for k, fn in cases.items():
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                            with grad():
                                fn()
                            row[k]["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                        else:
                            one = ["--config-file", args.config_file, "--sizes", size, "--batch", str(batch), *args.opts]
                            row[k].update(cpu_peak_memory_mb(one, what, k, offset))
                if args.precision != "fp32" and what == "backbone":
                    with torch.inference_mode():
                        for k, m in models.items():
                            row[k].update(precision_check(m.backbone.bottom_up, x, device, args.precision))
                row["ratio"] = round(row["dge"]["median_ms"] / row["vanilla"]["median_ms"], 4)
                row["runtime"] = args.runtime
                row["precision"] = args.precision
                case[what] = row
                print(
                    f"{what:8s} ({args.runtime}, {args.precision}) {hw[0]}x{hw[1]} batch {batch}: vanilla {row['vanilla']['median_ms']:.1f} ms, "
                    f"DGE {row['dge']['median_ms']:.1f} ms (β = {beta:.3f}{per_image}) -> ratio {row['ratio']:.3f}",
                    flush=True,
                )
            results["cases"].append(case)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def repeat_in_processes(args, argv):
    """Runs this tool ``args.processes`` times, each in a fresh process, and summarises every
    (input, batch, what) over the processes: median, min and max of the ratio."""
    child = []
    skip = 0
    for item in argv:  # drop --processes/--json (and their values) of this call
        if skip:
            skip -= 1
        elif item in ("--processes", "--json"):
            skip = 1
        elif item.startswith(("--processes=", "--json=")):
            continue
        else:
            child.append(item)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = os.path.join(tmp, f"process{k}.json")
            subprocess.run([sys.executable, __file__, "--processes", "1", "--json", out, *child], check=True)
            with open(out) as f:
                runs.append(json.load(f))
    summary = {key: runs[0][key] for key in ("config", "device", "threads", "routers")}
    summary.update(processes=args.processes, cases=[], per_process=runs)
    for i, case in enumerate(runs[0]["cases"]):
        row = {"size": case["size"], "batch": case["batch"], "beta": [r["cases"][i]["beta"] for r in runs]}
        for what in args.what:
            ratios = [r["cases"][i][what]["ratio"] for r in runs]
            row[what] = {
                "ratio_median": round(statistics.median(ratios), 4),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
                **{f"{v}_median_ms": [r["cases"][i][what][v]["median_ms"] for r in runs] for v in ("vanilla", "dge")},
            }
            print(
                f"{what:8s} {case['size'][0]}x{case['size'][1]} batch {case['batch']} over {args.processes} "
                f"processes: ratio {row[what]['ratio_median']:.3f} (median; {min(ratios):.3f}-{max(ratios):.3f})",
                flush=True,
            )
        summary["cases"].append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def memory_case(args, cfg, device):
    """Builds one variant, runs one case once and prints its peak RSS (MB) as JSON."""
    what, variant = args.memory_case
    models, _ = build_models(cfg, variants=("vanilla", "dge") if variant == "vanilla" else ("dge",))
    if variant == "vanilla":
        del models["dge"]
    elif args.logit_offset is not None:
        set_logit_offset(models["dge"], args.logit_offset)
    hw = tuple(int(v) for v in args.sizes[0].lower().split("x"))
    images = photos(args.batch[0], hw, device)
    x = normalise(models[variant], images)
    inputs = [{"image": img, "height": hw[0], "width": hw[1]} for img in images]
    fn = case_functions(what, models, x, inputs, cfg.MODEL.DGE.BUDGET)[variant]
    gc.collect()
    reset = reset_peak_rss()
    before = read_status_mb("VmRSS") if reset else None
    with torch.enable_grad() if what == "train" else torch.inference_mode():
        fn()  # the first run: a second one would reuse memory glibc kept from it
    if reset:
        peak = read_status_mb("VmHWM")
        print(json.dumps({"peak_rss_mb": round(peak, 1), "rss_increase_mb": round(peak - before, 1)}))
    else:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"process_peak_rss_mb (includes building the models)": round(lifetime, 1)}))


if __name__ == "__main__":
    main()
