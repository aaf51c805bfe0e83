"""The checks of the GPU path behind ``tools/device_check.sh`` (and its CPU dry run), each a
function that returns rows of one table, ``(check, case, measured, verdict)``:

* ``environment``: torch, CUDA, cuDNN, the GPU and the attention kernels DGE's calls take;
* ``varlen_rows``: a DGE block's training step with packed rows through ``varlen_attn``
  against the padded path and against float64 with each image alone: outputs and gradients;
* ``plan_rows``: attention time over 20 query counts against one repeated count, and the
  process's resident memory: a kernel that builds a plan per shape shows there;
* ``sync_rows``: host reads of one DGE block (``dge.analysis.syncs``), inference and training;
* ``latency_rows`` / ``pytest_row`` / ``train_row``: the table rows of tools/benchmark.py's
  JSON, a pytest log and a train_net.py log.
"""
import contextlib
import glob
import json
import os
import re
import statistics
import time
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

from dge.layers import DeformableAttention, DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
from dge.layers import record_routing
from dge.layers import kernels
from dge.layers.rows import QueryRows

from .latency import device_sync, read_status_mb
from .syncs import count_cuda_syncs, count_host_reads

__all__ = [
    "GRADIENT_NAMES",
    "HALF_TOLERANCE",
    "attention_plan_timings",
    "block_training_step",
    "environment",
    "host_gumbel_noise",
    "latency_rows",
    "plan_rows",
    "pytest_row",
    "relative_difference",
    "sync_case",
    "sync_rows",
    "train_row",
    "varlen_rows",
]

Row = Tuple[str, str, str, str]
HALF = (torch.float16, torch.bfloat16)
GRADIENT_NAMES = ("out", "x", "block.attn.q.weight", "block.attn.kv.weight", "router.gate.weight")
HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # relative, against float32 / float64


@contextlib.contextmanager
def host_gumbel_noise(seed: int) -> Iterator[None]:
    """The routers' uniform draws (``torch.rand_like``) made on the CPU from ``seed`` and moved
    to the logits' device: the same Gumbel noise on every device and in every dtype, and a
    batch's draws are its images' draws one after the other."""
    generator = torch.Generator().manual_seed(seed)
    rand_like = torch.rand_like

    def draw(t, dtype=None, **kwargs):
        return torch.rand(t.shape, generator=generator, dtype=dtype or t.dtype).to(t.device)

    torch.rand_like = draw
    try:
        yield
    finally:
        torch.rand_like = rand_like


def _routed(layer: DynamicGrainedEncoder, x: torch.Tensor):
    """(output, RoutingInfo) of one forward of a DGE block on 32×32 tokens."""
    with record_routing() as record:
        out = layer(x, (32, 32))
    return out, record.of(layer)


def block_training_step(device, dtype, packed: bool = True, alone: bool = False, seed: int = 5) -> Dict[str, torch.Tensor]:
    """One training step of a DGE block (SR attention, 2 heads of 32 channels, Φ = {1, 2, 4})
    on 3 images of 32×32 tokens that keep different query counts: the output ("out"), the
    input's ("x") and every parameter's gradient (float64, on the CPU) and the routing
    ("maps"). ``packed=False`` takes the padded attention path; ``alone=True`` runs each image
    as a batch of one (no packing, no padding: the definition the batch must meet)."""
    torch.manual_seed(seed)
    block = EncoderBlock(64, SpatialReductionAttention(64, 2, qkv_bias=True, sr_ratio=2))
    layer = DynamicGrainedEncoder(block, 64, dict(granularities=(1, 2, 4))).train()
    torch.nn.init.normal_(layer.router.gate.weight, std=0.5)  # mixed routing
    x = torch.randn(3, 32 * 32, 64)
    weights = torch.randn(3, 32 * 32, 64, dtype=torch.float64)
    layer = layer.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype).requires_grad_()
    parts = [x[i : i + 1] for i in range(3)] if alone else [x]
    available = kernels.packed_attention_available
    if not packed:
        kernels.packed_attention_available = lambda *args: False
    try:
        with host_gumbel_noise(seed):
            runs = [_routed(layer, part) for part in parts]
    finally:
        kernels.packed_attention_available = available
    y = torch.cat([out for out, _ in runs])
    loss = (y.double() * weights.to(device)).sum() + sum(r.query_count.double().sum() for _, r in runs)
    loss.backward()
    grads = {name: p.grad.double().cpu() for name, p in layer.named_parameters()}
    maps = torch.cat([r.granularity_map for _, r in runs]).cpu()
    return dict(grads, out=y.detach().double().cpu(), x=x.grad.double().cpu(), maps=maps)


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _compare(out: dict, ref: dict, tolerance: float) -> Tuple[str, str]:
    """(measured, verdict): the largest relative difference of GRADIENT_NAMES, and any zero."""
    diffs = {n: relative_difference(out[n], ref[n]) for n in GRADIENT_NAMES}
    zero = [n for n in GRADIENT_NAMES if out[n].abs().max() == 0]
    same_routing = torch.equal(out["maps"], ref["maps"])
    worst = max(diffs, key=diffs.get)
    measured = f"max rel. diff {diffs[worst]:.1e} ({worst}); routing {'same' if same_routing else 'DIFFERS'}"
    ok = same_routing and not zero and diffs[worst] < tolerance
    return measured, "ok" if ok else f"FAIL{' (zero: ' + ', '.join(zero) + ')' if zero else ''}"


def varlen_rows(device: str) -> List[Row]:
    """Step 1: packed rows through varlen_attn against the padded path (same device and dtype)
    and both against float64 on the CPU with each image alone."""
    ref = block_training_step("cpu", torch.float64, alone=True)
    padded32 = block_training_step(device, torch.float32, packed=False)
    rows = [("varlen vs padded", "padded fp32 vs fp64 alone", *_compare(padded32, ref, 1e-4))]
    for dtype in HALF:
        name = str(dtype).replace("torch.", "")
        probe = torch.zeros(1, 8, 64, device=device, dtype=dtype)
        if not kernels.packed_attention_available(probe, 32, 0.0):
            rows.append(("varlen vs padded", f"varlen {name}", f"not taken on {device}: packed rows are padded", "n/a"))
            continue
        varlen = block_training_step(device, dtype, packed=True)
        padded = block_training_step(device, dtype, packed=False)
        tol = HALF_TOLERANCE[dtype]
        rows.append(("varlen vs padded", f"varlen vs padded {name}", *_compare(varlen, padded, tol)))
        if torch.equal(varlen["maps"], ref["maps"]):
            rows.append(("varlen vs padded", f"varlen {name} vs fp64 alone", *_compare(varlen, ref, tol)))
        else:  # the dtype's rounding flipped a near tie of the Gumbel argmax: other queries
            rows.append(("varlen vs padded", f"varlen {name} vs fp64 alone", "routing differs (a near tie)", "n/a"))
    return rows


def _timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def attention_plan_timings(device, dtype, tokens=(200, 320), batch: int = 1, counts: int = 20) -> Dict[str, float]:
    """Milliseconds of a PVT-S stage-1 attention (C 64, 1 head, SR 8) forward + backward on
    ``counts`` query counts (30% to 70% of the tokens, each new) and on one count repeated
    ``counts`` times; the process's resident memory before and after (MB). Batch > 1: packed
    rows of ``batch`` images (varlen_attn where it applies)."""
    torch.manual_seed(0)
    h, w = tokens
    attn = SpatialReductionAttention(64, 1, qkv_bias=True, sr_ratio=8).to(device=device, dtype=dtype).train()
    context = torch.randn(batch, h * w, 64, device=device, dtype=dtype)
    sync = device_sync(torch.device(device))

    def call(total: int):
        counts = [total // batch] * batch
        counts[0] += total % batch
        rows = QueryRows(torch.tensor(counts, device=device), counts[0], total) if batch > 1 else None
        queries = torch.randn(1, total, 64, device=device, dtype=dtype, requires_grad=True)
        return lambda: attn(queries, context, tokens, None, rows).float().sum().backward()

    n = h * w * batch
    fresh = [int(n * (0.3 + 0.4 * i / (counts - 1))) // 8 * 8 + 3 for i in range(counts)]
    call(fresh[0])()  # warm-up: first-use costs that are not per shape
    rss_before = read_status_mb("VmRSS")
    new = [_timed(call(m), sync) for m in fresh]
    repeated = [_timed(call(fresh[0] - 8), sync) for _ in range(counts)]
    return dict(
        new_median=statistics.median(new),
        new_max=max(new),
        repeated_median=statistics.median(repeated),
        rss_before=rss_before,
        rss_after=read_status_mb("VmRSS"),
    )


def plan_rows(device: str, tokens=(200, 320)) -> List[Row]:
    """Step 2: attention over 20 different query counts against one repeated count, with DGE's
    kernels and (CUDA) with cuDNN allowed: a per-shape plan makes new counts slow."""
    cases = [("fp32, batch 1", torch.float32, 1)]
    if device == "cuda":
        cases += [("fp16, batch 1", torch.float16, 1), ("fp16, batch 2 packed", torch.float16, 2)]
    rows = []
    for cudnn in ([False, True] if device == "cuda" else [False]):
        os.environ[kernels.CUDNN_ATTENTION_ENV] = "1" if cudnn else "0"
        try:
            for name, dtype, batch in cases:
                t = attention_plan_timings(device, dtype, tokens, batch)
                ratio = t["new_max"] / t["new_median"]
                measured = (
                    f"new counts median {t['new_median']:.2f} ms, max {t['new_max']:.2f} ms ({ratio:.1f}x); "
                    f"one count {t['repeated_median']:.2f} ms; RSS {t['rss_before']:.0f} -> {t['rss_after']:.0f} MB"
                )
                if cudnn or device != "cuda":
                    verdict = "(reference)" if cudnn else "(dry run)"
                else:  # goal: no count slower than 2x the median, new counts as fast as a repeated one
                    verdict = "ok" if ratio <= 2.0 and t["new_median"] <= 2.0 * t["repeated_median"] else "SLOW"
                label = "cuDNN allowed" if cudnn else "DGE kernels"
                rows.append(("query counts", f"{label}: {name}", measured, verdict))
        finally:
            os.environ.pop(kernels.CUDNN_ATTENTION_ENV, None)
    return rows


def sync_case(device: str, kind: str, batch: int, training: bool):
    """One DGE block's inference (or training step: forward and backward) as a function, on
    40×48 tokens of ``batch`` images with mixed routing; ``kind`` "sr" (PVT) or "deformable"."""
    torch.manual_seed(3)
    attn = SpatialReductionAttention(64, 2, sr_ratio=2) if kind == "sr" else DeformableAttention(64, 2)
    layer = DynamicGrainedEncoder(EncoderBlock(64, attn), 64, dict(granularities=(1, 2, 4))).to(device).train(training)
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)  # mixed routing
    x = torch.randn(batch, 40 * 48, 64, device=device, requires_grad=training)
    if training:
        return lambda: layer(x, (40, 48)).sum().backward()
    return lambda: layer(x, (40, 48))


def sync_rows(device: str) -> List[Row]:
    """Step 3: host reads of one DGE block (PVT's SR and DPVT's deformable attention, batch 1
    and 2, inference and training): the one nonzero and nothing else."""
    rows = []
    for kind in ("sr", "deformable"):
        for batch in (1, 2):
            for training in (False, True):
                fn = sync_case(device, kind, batch, training)
                with torch.set_grad_enabled(training):
                    fn()  # warm-up: layouts are built on first use
                    reads = dict(count_host_reads(fn))
                    cuda = count_cuda_syncs(fn) if device == "cuda" else None
                measured = ", ".join(f"{k} {v}" for k, v in sorted(reads.items())) or "none"
                if cuda is not None:
                    measured += f"; CUDA syncs {cuda}"
                ok = reads == {"aten::nonzero": 1} and cuda in (None, 1)
                case = f"{'DPVT' if kind == 'deformable' else 'PVT'} block, batch {batch}, {'training' if training else 'inference'}"
                rows.append(("host syncs", case, measured, "ok" if ok else "FAIL"))
    return rows


def environment(device: str) -> List[Tuple[str, str]]:
    """(name, value) of what decides the GPU path: versions, the GPU, attention kernels."""
    items = [("torch", torch.__version__), ("CUDA", str(torch.version.cuda)), ("cuDNN", str(torch.backends.cudnn.version()))]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        items += [("GPU", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"), ("capability", "%d.%d" % (props.major, props.minor))]
        items += [("TF32 matmul / cuDNN", f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}")]
    items += [(f"attention: {k}", v) for k, v in kernels.attention_backends(torch.device(device)).items()]
    items.append((kernels.CUDNN_ATTENTION_ENV, os.environ.get(kernels.CUDNN_ATTENTION_ENV, "unset")))
    return items


def latency_rows(folder: str) -> List[str]:
    """Markdown rows of every ``bench_<model>_<precision>.json`` (tools/benchmark.py) in ``folder``."""
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "bench_*.json"))):
        model, precision = os.path.basename(path)[6:-5].rsplit("_", 1)
        with open(path) as f:
            cases = json.load(f)["cases"]
        for case in cases:
            for what in ("backbone", "train"):
                row = case.get(what)
                if not row:
                    continue
                check = row["dge"].get("max_rel_diff_to_fp32")
                betas = f"{row['dge']['beta_fp32']:.3f} / {row['dge']['beta']:.3f}" if check is not None else ""
                rows.append(
                    f"| {model} | {precision} | {what} | {case['batch']} | {row['vanilla']['median_ms']:.2f} | "
                    f"{row['dge']['median_ms']:.2f} | {row['ratio']:.3f} | {case['beta']:.3f} | "
                    f"{'' if check is None else f'{check:.2e}'} | {betas} |"
                )
    return rows


def pytest_row(log: str) -> Row:
    """The summary line of a pytest log (its last ``N passed, M skipped ...``)."""
    text = open(log).read() if os.path.exists(log) else ""
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error)[^=]*?)\s*=*$", text, re.M)
    summary = found[-1] if found else "no summary (see the log)"
    ok = bool(found) and "failed" not in summary and "error" not in summary
    return ("tests", "tests/layers/test_cuda.py", summary, "ok" if ok else "FAIL")


def train_row(log: str, iterations: int) -> Row:
    """train_net.py's last logged iteration and loss, and its evaluation's box AP / AP50 and β
    (detectron2's "copypaste" lines), from its log."""
    text = open(log).read() if os.path.exists(log) else ""
    iters = re.findall(r"iter: (\d+) .*?total_loss: ([\d.e+-]+)", text)
    boxes = re.findall(r"copypaste: Task: bbox\n.*\n.*copypaste: ([\d.]+),([\d.]+)", text)
    betas = re.findall(r"copypaste: Task: routing\n.*\n.*copypaste: ([\d.]+)", text)
    last = iters[-1] if iters else ("-", "-")
    measured = (
        f"iter {last[0]}, total_loss {last[1]}; evaluation: box AP/AP50 {'/'.join(boxes[-1]) if boxes else '-'}, "
        f"β {betas[-1] if betas else '-'}"
    )
    finished = bool(iters) and int(last[0]) + 1 >= iterations and bool(boxes)
    return ("train_net.py", f"demo config, {iterations} iterations", measured, "ok" if finished else "FAIL")


def markdown(rows: Sequence[Row]) -> str:
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)
