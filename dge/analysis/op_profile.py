"""Where the time goes, op by op, in each runtime: eager PyTorch and a ``torch.export``
program through torch's profiler (self CPU time per aten op), an ONNX file through
ONNX Runtime's profiler (kernel time per ONNX op type) or OpenVINO's counters (time per
node type of its compiled graph). ``tools/benchmark.py --op-profile``
prints the table (``op_table``)."""
import json
import os
from collections import defaultdict
from typing import Callable, Dict, List, Mapping, Optional

import torch

__all__ = ["torch_op_times", "onnxruntime_op_times", "openvino_op_times", "op_table"]


def torch_op_times(fn: Callable[[], object], runs: int = 3) -> Dict[str, float]:
    """{aten op: self CPU ms per run} of ``runs`` calls of ``fn`` (after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    times: Dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.key.startswith("aten::") and event.self_cpu_time_total > 0:
            times[event.key[len("aten::"):]] += event.self_cpu_time_total / 1e3 / runs
    return dict(times)


def onnxruntime_op_times(path: str, x: torch.Tensor, runs: int = 3, threads: Optional[int] = None) -> Dict[str, float]:
    """{ONNX op type: kernel ms per run} of ``runs`` calls of the ONNX file ``path`` on ``x``
    in an ONNX Runtime session made as ``dge.export.onnxruntime_session`` makes it, with
    ONNX Runtime's profiler on (after one unprofiled-in-the-sum call)."""
    from dge.export import onnxruntime_session

    prefix = os.path.join(os.path.dirname(os.path.abspath(path)), "ort_profile")
    session = onnxruntime_session(path, threads, profile_prefix=prefix)
    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    for _ in range(runs):
        session.run(None, feed)
    trace = session.end_profiling()
    with open(trace) as f:
        events = json.load(f)
    os.remove(trace)
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run: Dict[str, float] = defaultdict(float)
    for e in nodes[len(nodes) // (runs + 1):]:  # the first call's nodes are the warm-up
        per_run[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_run)


def openvino_op_times(path: str, x: torch.Tensor, runs: int = 3) -> Dict[str, float]:
    """{OpenVINO node type: ms per run} of ``runs`` calls of the ONNX file ``path`` compiled as
    ``dge.export.openvino_model`` compiles it, from its per-node counters (after one call)."""
    from dge.export import openvino_model

    request = openvino_model(path, profile=True).create_infer_request()
    request.infer(x.numpy())
    times: Dict[str, float] = defaultdict(float)
    for _ in range(runs):
        request.infer(x.numpy())
        for node in request.profiling_info:
            times[node.node_type] += node.real_time.total_seconds() * 1e3 / runs
    return dict(times)


def op_table(columns: Mapping[str, Mapping[str, float]], top: int = 10) -> str:
    """A markdown table: the ``top`` ops by their largest time in any column, one column per
    profile (ms per run), then "other" and the total of each column."""
    ops = sorted({op for times in columns.values() for op in times},
                 key=lambda op: -max(times.get(op, 0.0) for times in columns.values()))
    shown: List[str] = ops[:top]
    lines = ["| op | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for op in shown:
        lines.append(f"| {op} | " + " | ".join(f"{t.get(op, 0.0):.0f}" for t in columns.values()) + " |")
    other = [sum(v for k, v in t.items() if k not in shown) for t in columns.values()]
    lines.append("| other | " + " | ".join(f"{v:.0f}" for v in other) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(t.values()):.0f}**" for t in columns.values()) + " |")
    return "\n".join(lines)
