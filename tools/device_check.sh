#!/usr/bin/env bash
# The GPU check, one command (about 5 minutes on one GPU), one table at the end:
#   1. the test suite's CUDA cases (pytest -k cuda);
#   2. backbone latency, vanilla vs DGE at β ≈ 0.5 (calibrated routers), PVT-S and DPVT-S,
#      800×1280, batch 1 and 8, fp32 and fp16 (autocast), CUDA-synchronised medians
#      (tools/benchmark.py); fp16's largest difference to fp32 and the β of both;
#   3. one training step of each backbone with AMP (autocast fp16);
#   4. 20 iterations of the demo config through train_net.py --num-gpus 1 with
#      SOLVER.AMP.ENABLED True (detectron2's AMPTrainer), then its evaluation.
#
#   bash tools/device_check.sh [OUT_DIR]          # default: output/device_check
#
# Python: $PYTHON, else .venv/bin/python, else python3. It needs what requirements.txt
# lists and a detectron2 (v0.6 or current); a machine without an index can take them as
# wheels: DGE_WHEELS=DIR installs DIR/*.whl into a scratch site first (no index, no deps).
# On a machine without a CUDA device it stops after the imports, saying so (exit 3).
# DEVICE_CHECK_DEVICE=cpu DEVICE_CHECK_SIZE=128x160 DEVICE_CHECK_ITERS=2 runs the same steps
# on the CPU, small and without AMP in train_net.py (AMPTrainer needs CUDA): a dry run of
# the script itself, not a measurement.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-output/device_check}"
mkdir -p "$OUT_DIR"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
if [[ -n "${DGE_WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dge-site "$DGE_WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/dge-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
say() { echo "[device_check] $*"; }
DEVICE="${DEVICE_CHECK_DEVICE:-cuda}"
SIZE="${DEVICE_CHECK_SIZE:-800x1280}"
ITERS="${DEVICE_CHECK_ITERS:-20}"
AMP=True
[[ $DEVICE == cpu ]] && AMP=False

"$PY" -c "import torch, detectron2, timm, fvcore, pycocotools, dge" || { say "imports failed ($PY)"; exit 1; }
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU present (torch $("$PY" -c 'import torch; print(torch.__version__)')): nothing to measure"
    exit 3
fi
"$PY" -c "import torch; print('[device_check]', torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else 'CPU dry run', 'torch', torch.__version__)"
start=$SECONDS

say "1/4 the suite's CUDA cases"
"$PY" -m pytest -q -rs tests -k cuda -p no:cacheprovider > "$OUT_DIR/pytest_cuda.log" 2>&1
echo "exit $?" >> "$OUT_DIR/pytest_cuda.log"
tail -n 3 "$OUT_DIR/pytest_cuda.log"

say "2/4 and 3/4 latency and AMP training steps"
for model in pvt_s dpvt_s; do
    for precision in fp32 fp16; do
        what=(backbone)
        [[ $precision == fp16 ]] && what=(backbone train)
        "$PY" tools/benchmark.py --config-file "configs/mask_rcnn_${model}_dge_1x.yaml" --sizes "$SIZE" \
            --batch 1 8 --what "${what[@]}" --precision "$precision" --runs "${DEVICE_CHECK_RUNS:-10}" --warmup 3 \
            --json "$OUT_DIR/bench_${model}_${precision}.json" MODEL.DEVICE "$DEVICE" \
            > "$OUT_DIR/bench_${model}_${precision}.log" 2>&1 || say "benchmark $model $precision failed (see its log)"
        grep -E "^(backbone|train) " "$OUT_DIR/bench_${model}_${precision}.log"
    done
done

say "4/4 train_net.py, $ITERS iterations of the demo config (AMP $AMP)"
"$PY" train_net.py --config-file configs/demo_pvt_dge_synthetic.yaml --num-gpus 1 \
    SOLVER.MAX_ITER "$ITERS" SOLVER.AMP.ENABLED "$AMP" SOLVER.CHECKPOINT_PERIOD 1000 MODEL.DEVICE "$DEVICE" \
    OUTPUT_DIR "$OUT_DIR/train_amp" > "$OUT_DIR/train_amp.log" 2>&1
echo "exit $?" >> "$OUT_DIR/train_amp.log"
tail -n 2 "$OUT_DIR/train_amp.log"

"$PY" - "$OUT_DIR" "$((SECONDS - start))" "$AMP" <<'EOF'
import glob, json, os, re, sys
out, seconds, amp = sys.argv[1:4]
log = open(os.path.join(out, "pytest_cuda.log")).read()
summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|error).*?)\s*=*$", log, re.M)
print(f"\n| check | result |\n|---|---|\n| CUDA test cases | {summary[-1] if summary else 'no summary: see pytest_cuda.log'} |")
print("\n| model | precision | what | batch | vanilla ms | DGE ms | ratio | β | fp16 vs fp32 (rel) | β fp32 / fp16 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    model, precision = os.path.basename(path)[6:-5].rsplit("_", 1)
    for case in json.load(open(path))["cases"]:
        for what in ("backbone", "train"):
            row = case.get(what)
            if not row:
                continue
            check = row["dge"].get("max_rel_diff_to_fp32")
            betas = f"{row['dge']['beta_fp32']:.3f} / {row['dge']['beta']:.3f}" if check is not None else ""
            print(f"| {model} | {precision} | {what} | {case['batch']} | {row['vanilla']['median_ms']:.2f} | "
                  f"{row['dge']['median_ms']:.2f} | {row['ratio']:.3f} | {case['beta']:.3f} | "
                  f"{'' if check is None else f'{check:.2e}'} | {betas} |")
train = open(os.path.join(out, "train_amp.log")).read()
iters = re.findall(r"iter: (\d+) .*?total_loss: ([\d.e+-]+)", train)
boxes = re.findall(r"copypaste: ([\d.]+),([\d.]+)", train)
status = train.strip().splitlines()[-1]
print(f"\n| train_net.py, demo config, AMP {amp} | {status}; last logged iter {iters[-1][0] if iters else '-'}, "
      f"total_loss {iters[-1][1] if iters else '-'}; box AP/AP50 {boxes[0] if boxes else '-'} |")
print(f"\n[device_check] done in {seconds} s; logs and JSON in {out}")
EOF
