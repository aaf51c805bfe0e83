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
allocation thresholds), so one process is not enough for a claim. The measuring is
``dge.analysis.benchmark``; this is its command line.

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
import json
import re

import dge  # noqa: F401
from dge.analysis.benchmark import BenchmarkSpec, run_benchmark, run_in_processes
from dge.analysis.timm_benchmark import TimmSpec, run_timm_in_processes, timm_benchmark
from dge.analysis.latency import PRECISIONS, RUNTIMES


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="configs/mask_rcnn_pvt_s_dge_1x.yaml")
    parser.add_argument(
        "--timm-model",
        help="a timm model (ViT, EVA, SAM, Swin, PVT v2, Hiera, SAM 2's Hiera), against itself patched by "
        "dge.patch (forward_features, at each --batch), with its routing-free floor: its DGE blocks on the "
        "same query counts without routing",
    )
    parser.add_argument("--granularities", type=int, nargs="+", help="Φ of the patched timm model (default 1 2 4)")
    parser.add_argument(
        "--fit-windows", action="store_true",
        help="patched timm model: each block the largest region size that tiles its window (SAM 2's Hiera)",
    )
    parser.add_argument(
        "--breakdown", action="store_true",
        help="timm model: also time vanilla's leaf modules; the share of its time that DGE blocks run on queries "
             "only, and the ratio if only that share shrank with the queries (dge.analysis.time_shares)",
    )
    parser.add_argument("--sizes", nargs="+", default=["800x1280"], help="HxW input sizes")
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--what", nargs="+", default=["backbone"], choices=["backbone", "model", "train"])
    parser.add_argument(
        "--runtime", nargs="+", default=["eager"], metavar="{" + ",".join(RUNTIMES) + "}",
        help="backbone in eager PyTorch, as a torch.export program, in ONNX Runtime, in OpenVINO, or "
        "torch.compile'd; several are measured interleaved in one process (rows 'backbone', "
        "'backbone@onnxruntime', ...)",
    )
    parser.add_argument(
        "--op-profile", action="store_true",
        help="also profile each runtime op by op (torch's profiler; ONNX Runtime's, OpenVINO's counters) and print "
        "the table of ms per run (dge.analysis.op_profile)",
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
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser


def parse_size(text: str):
    h, w = text.lower().split("x")
    return int(h), int(w)


def split_runtimes(parser, args) -> None:
    """``--runtime eager onnxruntime MODEL.X y``: the runtimes end at the first config key, which
    starts the overrides; any other unknown value is an error."""
    known = [r in RUNTIMES for r in args.runtime]
    end = known.index(False) if False in known else len(known)
    rest = args.runtime[end:]
    if rest and not re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+", rest[0]):
        parser.error(f"--runtime: {rest[0]!r} is not one of {', '.join(RUNTIMES)}")
    if not end:
        parser.error(f"--runtime needs one of {', '.join(RUNTIMES)}")
    args.runtime, args.opts = args.runtime[:end], rest + args.opts


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be >= 1; got {args.processes}")
    split_runtimes(parser, args)
    spec = BenchmarkSpec(
        config_file=args.config_file, opts=tuple(args.opts), sizes=tuple(parse_size(s) for s in args.sizes),
        batch=tuple(args.batch), what=tuple(args.what), runtimes=tuple(args.runtime), op_profile=args.op_profile,
        precision=args.precision,
        target_beta=args.target_beta, per_block=args.calibration == "per-block", runs=args.runs,
        warmup=args.warmup, memory=args.memory,
    )
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.timm_model:
        timm_spec = TimmSpec(
            args.timm_model, spec.sizes, spec.batch, args.target_beta, args.runs, args.warmup,
            {"granularities": tuple(args.granularities)} if args.granularities else {}, args.fit_windows,
            args.breakdown,
        )
        results = (run_timm_in_processes(timm_spec, args.processes, say) if args.processes > 1
                   else timm_benchmark(timm_spec, say))
    elif args.processes > 1:
        results = run_in_processes(spec, args.processes, say)
    else:
        results = run_benchmark(spec, say)
        print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
