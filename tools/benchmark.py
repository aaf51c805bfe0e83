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
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import dge  # noqa: E402,F401
from dge.config import load_config  # noqa: E402
from dge.data import DEFAULT_PHOTOS, iter_images  # noqa: E402
from dge.analysis.calibration import calibrate, randomize_routers, set_logit_offset  # noqa: E402
from dge.export import FILE_SUFFIXES, ExportedModel, RoutedOutputs, export_module  # noqa: E402
from dge.layers import budget_loss, complexity_report, dge_modules  # noqa: E402


def photos(batch: int, hw, device) -> torch.Tensor:
    """[batch, 3, H, W] float RGB in 0..255 from scikit-image's photographs."""
    import cv2

    images = [img for _, img in iter_images(DEFAULT_PHOTOS)]
    out = [cv2.resize(images[i % len(images)], (hw[1], hw[0]))[:, :, ::-1] for i in range(batch)]
    return torch.as_tensor(np.stack(out).transpose(0, 3, 1, 2).copy(), dtype=torch.float32, device=device)


def normalise(model, images: torch.Tensor) -> torch.Tensor:
    return (images - model.pixel_mean.view(1, -1, 1, 1)) / model.pixel_std.view(1, -1, 1, 1)


def timed_interleaved(cases: dict, runs: int, warmup: int, sync) -> dict:
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in cases}
    for _ in range(runs):
        for k, fn in cases.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    return samples


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Resets this process's peak resident memory (Linux: VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


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


def build_models(cfg, variants=("vanilla", "dge")):
    """{variant: model}: the DGE model (MODEL.WEIGHTS if given) and its vanilla twin with the
    same weights but the routers. Untrained routers get weights of std 1/√C (seeded) so that
    regions differ."""
    torch.manual_seed(0)
    dge_model = build_model(cfg).eval()
    trained = bool(cfg.MODEL.WEIGHTS)
    if trained:
        DetectionCheckpointer(dge_model).load(cfg.MODEL.WEIGHTS)
    else:
        randomize_routers(dge_model, seed=0)
    models = {"dge": dge_model}
    if "vanilla" in variants:
        vanilla_cfg = cfg.clone()
        vanilla_cfg.MODEL.DGE.ENABLED = False
        models["vanilla"] = build_model(vanilla_cfg).eval()
        models["vanilla"].load_state_dict(vanilla_state_dict(dge_model))  # same weights but the routers
    return models, trained


RUNTIMES = ("eager", "exported", "onnxruntime", "compile")


def backbone_runner(backbone, x, runtime: str, workdir: str):
    """A function running ``backbone`` on ``x`` in ``runtime``: eager; ``exported``
    (torch.export, the program's module); ``onnxruntime`` (ONNX of the exported program,
    onnxruntime on torch's thread count); ``compile`` (``torch.compile``, dynamic query
    counts captured as unbacked sizes). Exports and compiles happen here, before timing."""
    if runtime == "eager":
        return lambda: backbone(x)
    if runtime == "compile":
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        compiled = torch.compile(backbone)
        return lambda: compiled(x)
    module = RoutedOutputs(backbone).eval()
    fmt = "exported" if runtime == "exported" else "onnx"
    path = os.path.join(workdir, f"{id(backbone)}{FILE_SUFFIXES[fmt]}")
    export_module(module, x, path, fmt)
    exported = ExportedModel(path)
    return lambda: exported(x)


def case_functions(what, models, x, inputs, budget, runtime="eager", workdir=None):
    if runtime != "eager" and what != "backbone":
        raise ValueError(f"--runtime {runtime} measures the backbone only (--what backbone); got --what {what}")
    if what == "train":
        budgets = {"vanilla": None, "dge": budget}
        return {k: train_step(m.backbone.bottom_up, x, budgets[k]) for k, m in models.items()}
    if what == "backbone":
        return {k: backbone_runner(m.backbone.bottom_up, x, runtime, workdir) for k, m in models.items()}
    return {k: (lambda m=m: m(inputs)) for k, m in models.items()}


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def with_precision(fn, device: torch.device, precision: str):
    """``fn`` under ``torch.autocast`` in ``precision`` (fp32: ``fn`` itself); a training step
    under autocast is AMP's (the loss scaler's work is negligible)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return fn

    def run():
        with torch.autocast(device.type, dtype=dtype):
            return fn()

    return run


def precision_check(backbone, x, device, precision: str) -> dict:
    """The backbone under autocast against float32 on ``x``: largest difference of the output
    maps relative to their largest value, and β of both."""
    reference = backbone(x)
    beta32 = complexity_report(backbone).beta.mean().item() if dge_modules(backbone) else None
    out = with_precision(lambda: backbone(x), device, precision)()
    beta = complexity_report(backbone).beta.mean().item() if dge_modules(backbone) else None
    diff = max(float((out[k].float() - v).abs().max() / v.abs().max()) for k, v in reference.items())
    return {"max_rel_diff_to_fp32": diff, "beta_fp32": beta32, "beta": beta}


def largest_difference(function, backbone, x) -> float:
    """Largest |output - eager output| of a runtime's ``function`` over the backbone's maps."""
    reference = backbone(x)
    out = function()
    return max(float((out[k] - v).abs().max()) for k, v in reference.items())


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
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
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
                dge_model.backbone.bottom_up(x)
                report = complexity_report(dge_model)
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
    before = _status_mb("VmRSS") if reset else None
    with torch.enable_grad() if what == "train" else torch.inference_mode():
        fn()  # the first run: a second one would reuse memory glibc kept from it
    if reset:
        peak = _status_mb("VmHWM")
        print(json.dumps({"peak_rss_mb": round(peak, 1), "rss_increase_mb": round(peak - before, 1)}))
    else:
        lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"process_peak_rss_mb (includes building the models)": round(lifetime, 1)}))


def vanilla_state_dict(model) -> dict:
    """The state dict of ``model`` laid out as its vanilla twin's: the DGE wrappers' block
    parameters without ``.block``, no routers."""
    wrappers = [name for name, m in model.named_modules() if m in set(dge_modules(model))]
    out = {}
    for key, value in model.state_dict().items():
        owner = next((w for w in wrappers if key.startswith(w + ".")), None)
        if owner is None:
            out[key] = value
        elif key.startswith(owner + ".block."):
            out[owner + "." + key[len(owner) + len(".block."):]] = value
    return out


def train_step(backbone, x, budget):
    """One training step of ``backbone`` on ``x``: mean of its outputs (+ the budget loss)."""
    backbone = copy.deepcopy(backbone).train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-6)

    def step():
        outputs = backbone(x)
        loss = sum(v.float().mean() for v in outputs.values())
        if budget is not None:
            loss = loss + budget_loss(complexity_report(backbone).beta, budget)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


if __name__ == "__main__":
    main()
