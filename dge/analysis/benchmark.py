"""DGE model against its vanilla twin: latency of the backbone, the whole model or a training
step, interleaved in one process (``run_benchmark``), repeated in fresh processes
(``run_in_processes``), and peak memory per case in a fresh process (``cpu_peak_memory``).
``tools/benchmark.py`` is the command line over these."""
import concurrent.futures
import gc
import multiprocessing
import resource
import statistics
import tempfile
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..config import load_config
from ..layers import complexity_report, record_routing
from ..layers.calibration import calibrate, set_logit_offset
from .op_profile import onnxruntime_op_times, op_table, openvino_op_times, torch_op_times
from .latency import (
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

__all__ = [
    "BenchmarkSpec",
    "row_key",
    "run_benchmark",
    "run_in_processes",
    "cpu_peak_memory",
    "summarise_processes",
]


@dataclass(frozen=True)
class BenchmarkSpec:
    """What to measure (the options of ``tools/benchmark.py``)."""

    config_file: str = "configs/mask_rcnn_pvt_s_dge_1x.yaml"
    opts: Tuple[str, ...] = ()
    sizes: Tuple[Tuple[int, int], ...] = ((800, 1280),)
    batch: Tuple[int, ...] = (1,)
    what: Tuple[str, ...] = ("backbone",)
    runtimes: Tuple[str, ...] = ("eager",)  # measured interleaved in one process
    op_profile: bool = False  # also time each op (dge.analysis.op_profile): "ops_ms" per variant
    precision: str = "fp32"
    target_beta: float = 0.5
    per_block: bool = False  # calibration: one offset per router (else one shared offset)
    runs: int = 7
    warmup: int = 2
    memory: bool = False


@dataclass
class _Setup:
    cfg: object
    device: torch.device
    models: Dict[str, torch.nn.Module]
    trained: bool


def _setup(spec: BenchmarkSpec, variants=("vanilla", "dge")) -> _Setup:
    cfg = load_config(spec.config_file, list(spec.opts))
    cfg.MODEL.DGE.ENABLED = True
    models, trained = build_models(cfg, variants)
    return _Setup(cfg, torch.device(cfg.MODEL.DEVICE), models, trained)


def _route(spec: BenchmarkSpec, setup: _Setup, x: torch.Tensor) -> dict:
    """Calibrates untrained routers to the target β on ``x``; the case's β numbers."""
    dge_model, offset = setup.models["dge"], None
    with torch.inference_mode():
        if not setup.trained:
            offset, _ = calibrate(dge_model, lambda: dge_model.backbone.bottom_up(x), spec.target_beta,
                                  per_block=spec.per_block)
        with record_routing() as record:
            dge_model.backbone.bottom_up(x)
    report = complexity_report(record, dge_model)
    case = {
        "beta": round(report.beta.mean().item(), 4),
        "beta_per_image": [round(b, 4) for b in report.beta.tolist()],
        "beta_per_block": [round(b, 4) for b in report.layer_beta.mean(dim=1).tolist()],
    }
    if offset is not None:
        case["calibrated_logit_offsets"] = [round(o, 3) for o in offset]
    return case


def row_key(what: str, runtime: str) -> str:
    """A case's key for one (what, runtime): ``what`` in eager PyTorch, else ``what@runtime``."""
    return what if runtime == "eager" else f"{what}@{runtime}"


def _runtime_cases(spec: BenchmarkSpec, setup: _Setup, what: str, x, inputs, workdir: str) -> dict:
    """{(runtime, variant): function} for every runtime of ``spec`` (exports made here)."""
    cases = {}
    with torch.no_grad():
        for runtime in spec.runtimes:
            functions = case_functions(what, setup.models, x, inputs, setup.cfg.MODEL.DGE.BUDGET, runtime, workdir)
            for k, fn in functions.items():
                cases[runtime, k] = with_precision(fn, setup.device, spec.precision)
    return cases


def _op_times(runtime: str, fn, x) -> Dict[str, float]:
    """{op: ms per run} of one case: ONNX Runtime's or OpenVINO's profile for ONNX files, torch's
    otherwise."""
    if runtime == "onnxruntime":
        return onnxruntime_op_times(fn.export_path, x)
    if runtime == "openvino":
        return openvino_op_times(fn.export_path, x)
    return torch_op_times(fn)


def _timed(spec: BenchmarkSpec, setup: _Setup, what: str, x, inputs) -> Dict[str, dict]:
    """Interleaved runs of vanilla and DGE in every runtime: {row_key: row}, a row holding
    median / min / max ms per variant, the ratio, and outside eager the largest difference to
    eager's outputs."""
    grad = torch.enable_grad if what == "train" else torch.inference_mode
    with tempfile.TemporaryDirectory() as workdir:
        cases = _runtime_cases(spec, setup, what, x, inputs, workdir)
        with grad():
            samples = timed_interleaved(cases, spec.runs, spec.warmup, device_sync(setup.device))
        rows = {}
        for runtime in spec.runtimes:
            row = {k: {"median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2),
                       "max_ms": round(max(v), 2)} for (rt, k), v in samples.items() if rt == runtime}
            if runtime != "eager":
                with torch.inference_mode():
                    for k in row:
                        model = setup.models[k].backbone.bottom_up
                        row[k]["max_abs_diff_to_eager"] = largest_difference(cases[runtime, k], model, x)
            if spec.op_profile:
                for k in row:
                    row[k]["ops_ms"] = _op_times(runtime, cases[runtime, k], x)
            if spec.precision != "fp32" and what == "backbone":
                with torch.inference_mode():
                    for k, m in setup.models.items():
                        row[k].update(precision_check(m.backbone.bottom_up, x, setup.device, spec.precision))
            row.update(ratio=round(row["dge"]["median_ms"] / row["vanilla"]["median_ms"], 4), runtime=runtime,
                       precision=spec.precision)
            rows[row_key(what, runtime)] = row
    return rows


def _peak_memory(spec: BenchmarkSpec, setup: _Setup, what: str, hw, batch: int, offset) -> Dict[str, dict]:
    """Peak memory of each variant's case: CUDA's allocator peak, or on the CPU the RSS of a
    fresh process per variant (``cpu_peak_memory``)."""
    out = {}
    for variant in ("vanilla", "dge"):
        if setup.device.type == "cuda":
            images = photos(batch, hw, setup.device)
            x = normalise(setup.models[variant], images)
            inputs = [{"image": img, "height": hw[0], "width": hw[1]} for img in images]
            fn = case_functions(what, setup.models, x, inputs, setup.cfg.MODEL.DGE.BUDGET)[variant]
            torch.cuda.reset_peak_memory_stats()
            with torch.enable_grad() if what == "train" else torch.inference_mode():
                fn()
            out[variant] = {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
        else:
            one = replace(spec, sizes=(tuple(hw),), batch=(batch,))
            out[variant] = _in_fresh_process(cpu_peak_memory, one, what, variant, offset)
    return out


def run_benchmark(spec: BenchmarkSpec, say=print) -> dict:
    """Every (size, batch, what) of ``spec`` in this process; ``say`` gets one line per case."""
    setup = _setup(spec)
    device = setup.device
    results = {
        "config": spec.config_file,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "routers": "trained (MODEL.WEIGHTS)" if setup.trained else "untrained: weights re-initialised, finest-logit "
        f"offsets calibrated to the target β ({'per-block' if spec.per_block else 'shared'})",
        "cases": [],
    }
    for hw in spec.sizes:
        for batch in spec.batch:
            images = photos(batch, hw, device)
            x = normalise(setup.models["dge"], images)
            inputs = [{"image": img, "height": hw[0], "width": hw[1]} for img in images]
            case = dict(size=list(hw), batch=batch, **_route(spec, setup, x))
            for what in spec.what:
                rows = _timed(spec, setup, what, x, inputs)
                if spec.memory and what in rows:
                    offset = case.get("calibrated_logit_offsets")
                    for variant, numbers in _peak_memory(spec, setup, what, hw, batch, offset).items():
                        rows[what][variant].update(numbers)
                case.update(rows)
                for key, row in rows.items():
                    say(_case_line(what, hw, batch, case, row))
                if spec.op_profile:
                    say(op_table({f"{k} {row['runtime']}": row[k]["ops_ms"] for row in rows.values()
                                  for k in ("vanilla", "dge")}))
            results["cases"].append(case)
    return results


def _case_line(what: str, hw, batch: int, case: dict, row: dict) -> str:
    per_image = "" if batch == 1 else "; per image " + ", ".join(f"{b:.2f}" for b in case["beta_per_image"])
    return (
        f"{what:8s} ({row['runtime']}, {row['precision']}) {hw[0]}x{hw[1]} batch {batch}: vanilla "
        f"{row['vanilla']['median_ms']:.1f} ms, DGE {row['dge']['median_ms']:.1f} ms "
        f"(β = {case['beta']:.3f}{per_image}) -> ratio {row['ratio']:.3f}"
    )


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (spawned: no OpenMP state, its own RSS peak)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def run_in_processes(spec: BenchmarkSpec, processes: int, say=print) -> dict:
    """``run_benchmark`` in ``processes`` fresh processes, one after the other, and each
    ratio's median and range over them (``summarise_processes``): on a 2-core CPU the DGE
    latency differs between processes by up to 10% (glibc's allocation thresholds)."""
    runs = [_in_fresh_process(run_benchmark, spec) for _ in range(processes)]
    return summarise_processes(runs, [row_key(w, rt) for w in spec.what for rt in spec.runtimes], say)


def summarise_processes(runs: Sequence[dict], whats: Sequence[str], say=print) -> dict:
    """Median, min and max of every (input, batch, what) ratio over the runs of several processes."""
    summary = {key: runs[0][key] for key in ("config", "device", "threads", "routers")}
    summary.update(processes=len(runs), cases=[], per_process=list(runs))
    for i, case in enumerate(runs[0]["cases"]):
        row = {"size": case["size"], "batch": case["batch"], "beta": [r["cases"][i]["beta"] for r in runs]}
        for what in whats:
            ratios = [r["cases"][i][what]["ratio"] for r in runs]
            row[what] = {
                "ratio_median": round(statistics.median(ratios), 4),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
                **{f"{v}_median_ms": [r["cases"][i][what][v]["median_ms"] for r in runs] for v in ("vanilla", "dge")},
            }
            size = f"{case['size'][0]}x{case['size'][1]}"
            say(f"{what:8s} {size} batch {case['batch']} over {len(runs)} processes: ratio "
                f"{row[what]['ratio_median']:.3f} (median; {min(ratios):.3f}-{max(ratios):.3f})")
        summary["cases"].append(row)
    return summary


def cpu_peak_memory(spec: BenchmarkSpec, what: str, variant: str, offset: Optional[List[float]]) -> dict:
    """In a fresh process (``_in_fresh_process``): builds ``variant`` alone, runs its case once
    and returns {"peak_rss_mb", "rss_increase_mb"} (the peak minus the resident memory just
    before the run: first-call workspaces are in the increase), or the process's lifetime peak
    when the peak cannot be reset (then it includes building the models)."""
    setup = _setup(spec, ("vanilla", "dge") if variant == "vanilla" else ("dge",))
    if variant == "vanilla":
        del setup.models["dge"]
    elif offset is not None:
        set_logit_offset(setup.models["dge"], offset)
    hw, batch = spec.sizes[0], spec.batch[0]
    images = photos(batch, hw, setup.device)
    x = normalise(setup.models[variant], images)
    inputs = [{"image": img, "height": hw[0], "width": hw[1]} for img in images]
    fn = case_functions(what, setup.models, x, inputs, setup.cfg.MODEL.DGE.BUDGET)[variant]
    gc.collect()
    reset = reset_peak_rss()
    before = read_status_mb("VmRSS") if reset else None
    with torch.enable_grad() if what == "train" else torch.inference_mode():
        fn()  # the first run: a second one would reuse memory glibc kept from it
    if reset:
        peak = read_status_mb("VmHWM")
        return {"peak_rss_mb": round(peak, 1), "rss_increase_mb": round(peak - before, 1)}
    lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"process_peak_rss_mb (includes building the models)": round(lifetime, 1)}
