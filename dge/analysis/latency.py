"""Latency of a DGE model against its vanilla twin, the library behind ``tools/benchmark.py``
and ``tools/benchmark_block.py``: inputs (scikit-image's photographs), the twin with the same
weights, the functions each case times (backbone in a runtime, whole model, training step,
autocast), the one timing loop (interleaved runs), a timer of a module's forwards inside a
larger run (``ForwardTimer``) and Linux resident-memory readings."""
import copy
import os
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from detectron2.modeling import build_model

from dge.detectron2.data import DEFAULT_PHOTOS, iter_images
from dge.detectron2.engine import load_weights
from dge.export import FILE_SUFFIXES, ExportedModel, RoutedOutputs, export_module
from dge.layers import BudgetLoss, complexity_report, dge_modules, record_routing
from dge.layers.keys import vanilla_state_dict

from ..layers.calibration import randomize_routers

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "ForwardTimer",
    "backbone_runner",
    "build_models",
    "case_functions",
    "device_sync",
    "largest_difference",
    "normalise",
    "photos",
    "precision_check",
    "read_status_mb",
    "reset_peak_rss",
    "timed_interleaved",
    "train_step",
    "with_precision",
]


def photos(batch: int, hw, device) -> torch.Tensor:
    """[batch, 3, H, W] float RGB in 0..255 from scikit-image's photographs."""
    import cv2

    images = [img for _, img in iter_images(DEFAULT_PHOTOS)]
    out = [cv2.resize(images[i % len(images)], (hw[1], hw[0]))[:, :, ::-1] for i in range(batch)]
    return torch.as_tensor(np.stack(out).transpose(0, 3, 1, 2).copy(), dtype=torch.float32, device=device)


def normalise(model, images: torch.Tensor) -> torch.Tensor:
    return (images - model.pixel_mean.view(1, -1, 1, 1)) / model.pixel_std.view(1, -1, 1, 1)


def device_sync(device) -> Callable[[], None]:
    """A function that waits for ``device``'s queued work: ``torch.cuda.synchronize`` on a GPU,
    nothing on the CPU."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def timed_interleaved(
    cases: Dict[str, Callable[[], object]], runs: int, warmup: int, sync: Callable[[], None] = lambda: None
) -> Dict[str, List[float]]:
    """{case: [ms per run]}: ``warmup`` untimed calls of each case, then ``runs`` rounds that
    call every case once in turn (interleaved: slow drifts of the machine hit all cases
    alike). ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU)."""
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


class ForwardTimer:
    """Wall time of every forward of ``module`` while in the ``with`` block, in ms (``samples``),
    from forward hooks: e.g. the backbone's share of a whole evaluation, measured in the same
    run as its AP. ``sync`` waits for the device (``torch.cuda.synchronize`` on a GPU) at both
    ends of each forward; ``skip`` first forwards are left out (warm-up)."""

    def __init__(self, module: torch.nn.Module, sync: Callable[[], None] = lambda: None, skip: int = 0):
        self.module, self.sync, self.skip = module, sync, skip
        self.samples: List[float] = []
        self._seen = 0
        self._start = None
        self._handles = []

    def _pre(self, module, args):
        self.sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.sync()
        ms = (time.perf_counter() - self._start) * 1e3
        self._seen += 1
        if self._seen > self.skip:
            self.samples.append(ms)

    def __enter__(self) -> "ForwardTimer":
        self._handles = [self.module.register_forward_pre_hook(self._pre), self.module.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def median(self) -> float:
        """Median ms per forward; a ValueError when no forward was timed."""
        if not self.samples:
            raise ValueError(f"no forward of {type(self.module).__name__} was timed (after skipping {self.skip})")
        return float(np.median(self.samples))


def read_status_mb(field: str) -> float:
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


def build_models(cfg, variants=("vanilla", "dge")):
    """{variant: model}: the DGE model (MODEL.WEIGHTS if given) and its vanilla twin with the
    same weights but the routers. Untrained routers get weights of std 1/√C (seeded) so that
    regions differ."""
    torch.manual_seed(0)
    dge_model = build_model(cfg).eval()
    trained = bool(cfg.MODEL.WEIGHTS)
    if trained:
        load_weights(dge_model, cfg)
    else:
        randomize_routers(dge_model, seed=0)
    models = {"dge": dge_model}
    if "vanilla" in variants:
        vanilla_cfg = cfg.clone()
        vanilla_cfg.MODEL.DGE.ENABLED = False
        models["vanilla"] = build_model(vanilla_cfg).eval()
        loaded = models["vanilla"].load_state_dict(vanilla_state_dict(dge_model), strict=False)  # all but the routers
        assert not loaded.missing_keys, loaded.missing_keys
    return models, trained


RUNTIMES = ("eager", "exported", "onnxruntime", "openvino", "compile")


def backbone_runner(backbone, x, runtime: str, workdir: str):
    """A function running ``backbone`` on ``x`` in ``runtime``: eager; ``exported``
    (torch.export, the program's module); ``onnxruntime`` / ``openvino`` (ONNX of the exported
    program in ONNX Runtime / OpenVINO, on torch's thread count); ``compile``
    (``torch.compile``, dynamic query counts captured as unbacked sizes). Exports and compiles
    happen here, before timing; an exported runner's ``export_path`` is its file."""
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
    exported = ExportedModel(path, runtime=runtime if runtime == "openvino" else "onnxruntime")

    def run():
        return exported(x)

    run.export_path = path  # for op_profile
    return run


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
    with record_routing() as record32:
        reference = backbone(x)
    with record_routing() as record:
        out = with_precision(lambda: backbone(x), device, precision)()
    has_dge = bool(dge_modules(backbone))
    beta32 = complexity_report(record32, backbone).beta.mean().item() if has_dge else None
    beta = complexity_report(record, backbone).beta.mean().item() if has_dge else None
    diff = max(float((out[k].float() - v).abs().max() / v.abs().max()) for k, v in reference.items())
    return {"max_rel_diff_to_fp32": diff, "beta_fp32": beta32, "beta": beta}


def largest_difference(function, backbone, x) -> float:
    """Largest |output - eager output| of a runtime's ``function`` over the backbone's maps."""
    reference = backbone(x)
    out = function()
    return max(float((out[k] - v).abs().max()) for k, v in reference.items())


def train_step(backbone, x, budget):
    """One training step of ``backbone`` on ``x``: mean of its outputs (+ the budget loss)."""
    backbone = copy.deepcopy(backbone).train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-6)

    def step():
        with record_routing() as record:
            outputs = backbone(x)
        loss = sum(v.float().mean() for v in outputs.values())
        if budget is not None:
            loss = loss + BudgetLoss(budget)(backbone, record)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step
