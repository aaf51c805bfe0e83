#!/usr/bin/env bash
# The GPU check in one command, one table at the end (projects/DGE/README.md, "GPU"):
#
#   bash tools/device_check.sh [OUT_DIR]          # default: output/device_check
#
# Steps, in order of value, each on its own with a time limit (a failed or timed-out step
# leaves a FAIL row and the next one runs); the limits end it within 8 minutes, install included:
#   1. varlen vs padded attention: a DGE block's training step, outputs and gradients
#   2. attention time over 20 query counts against one repeated count (a kernel that builds a
#      plan per shape shows here), host memory before and after; cuDNN allowed, for reference
#   3. host syncs per DGE block (CUDA's sync debug mode and dge.analysis.syncs)
#   4. PVT-S / DPVT-S backbones vanilla vs DGE at β ≈ 0.5, 800×1280, batch 1 and 8, fp32 and fp16
#   5. an AMP training step, vanilla vs DGE (tools/benchmark.py --what train, with 4)
#   6. tests/layers/test_cuda.py
#   7. 20 AMP iterations of the demo through train_net.py --num-gpus 1, and its evaluation
# The table grows in OUT_DIR/table.md as the steps finish; every step's log is in OUT_DIR.
#
# Python: $PYTHON, else .venv/bin/python, else python3. A machine with torch, torchvision,
# timm, numpy and opencv but no index takes the rest as wheels (tools/setup/gpu_wheels.sh):
# DGE_WHEELS=DIR installs them into a scratch site first (--no-index --no-deps).
# DEVICE_CHECK_DEVICE=cpu runs every step on the CPU, small and without AMP: a dry run of the
# script, not a measurement (about 3 minutes on 2 cores). Without a CUDA device and without
# it, the script says so and stops (exit 3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-output/device_check}"
mkdir -p "$OUT_DIR"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi
say() { echo "[device_check] $*"; }
start=$SECONDS
if [[ -n "${DGE_WHEELS:-}" ]]; then
    mapfile -t names < <(ls "$DGE_WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | sort -u)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --find-links "$DGE_WHEELS" --target /tmp/dge-site "${names[@]}" || { say "installing $DGE_WHEELS failed"; exit 1; }
    export PYTHONPATH="/tmp/dge-site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    say "installed ${#names[@]} wheels from $DGE_WHEELS in $((SECONDS - start)) s"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
DEVICE="${DEVICE_CHECK_DEVICE:-cuda}"
if [[ $DEVICE == cuda ]]; then
    SIZE=800x1280 BATCHES="1 8" RUNS=10 WARMUP=2 ITERS=20 AMP=True TOKENS="200 320"
else
    SIZE=128x160 BATCHES=1 RUNS=1 WARMUP=1 ITERS=2 AMP=False TOKENS="50 80"
fi

"$PY" -c "import torch, detectron2, timm, fvcore, pycocotools, dge" || { say "imports failed ($PY)"; exit 1; }
if [[ $DEVICE == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    say "no CUDA GPU present (torch $("$PY" -c 'import torch; print(torch.__version__)')): nothing to measure"
    exit 3
fi
"$PY" tools/device_check.py env --device "$DEVICE" | tee "$OUT_DIR/environment.txt"
TABLE="$OUT_DIR/table.md"
printf '| check | case | measured | verdict |\n|---|---|---|---|\n' > "$TABLE"

# step NAME SECONDS ROWS CMD...: runs CMD with a time limit, its output in NAME.log; ROWS=rows:
# its stdout is table rows (tools/device_check.py), appended to the table.
step() {
    local name=$1 limit=$2 rows=$3
    shift 3
    say "$name (limit ${limit} s)"
    if [[ $rows == rows ]]; then
        timeout "$limit" "$@" > "$OUT_DIR/$name.rows" 2> "$OUT_DIR/$name.log"
    else
        timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    fi
    local rc=$?
    [[ $rows == rows ]] && grep '^|' "$OUT_DIR/$name.rows" | tee -a "$TABLE"
    if [[ $rc -ne 0 ]]; then
        local why="exit $rc"
        [[ $rc -eq 124 ]] && why="timed out after $limit s"
        echo "| $name | - | $why (see $name.log) | FAIL |" | tee -a "$TABLE"
    fi
}

step 1-varlen 40 rows "$PY" tools/device_check.py varlen --device "$DEVICE"
step 2-plans 40 rows "$PY" tools/device_check.py plans --device "$DEVICE" --tokens $TOKENS
step 3-syncs 25 rows "$PY" tools/device_check.py syncs --device "$DEVICE"
for model in pvt_s dpvt_s; do
    for precision in fp32 fp16; do
        what=(backbone) limit=45
        [[ $precision == fp16 ]] && what=(backbone train) limit=60
        step "4-bench_${model}_${precision}" $limit log "$PY" tools/benchmark.py \
            --config-file "configs/mask_rcnn_${model}_dge_1x.yaml" --sizes "$SIZE" --batch $BATCHES \
            --what "${what[@]}" --precision "$precision" --runs "$RUNS" --warmup "$WARMUP" \
            --json "$OUT_DIR/bench_${model}_${precision}.json" MODEL.DEVICE "$DEVICE"
    done
done
step 6-tests 60 log "$PY" -m pytest -q -rs -p no:cacheprovider tests/layers/test_cuda.py
"$PY" tools/device_check.py tests "$OUT_DIR/6-tests.log" | tee -a "$TABLE"
step 7-train_net 75 log "$PY" train_net.py --config-file configs/demo_pvt_dge_synthetic.yaml --num-gpus 1 \
    SOLVER.MAX_ITER "$ITERS" SOLVER.AMP.ENABLED "$AMP" SOLVER.CHECKPOINT_PERIOD 1000 MODEL.DEVICE "$DEVICE" \
    OUTPUT_DIR "$OUT_DIR/train_net"
"$PY" tools/device_check.py train "$OUT_DIR/7-train_net.log" "$ITERS" | tee -a "$TABLE"

{
    echo
    echo "| model | precision | what | batch | vanilla ms | DGE ms | ratio | β | fp16 vs fp32 (rel) | β fp32 / fp16 |"
    echo "|---|---|---|---|---|---|---|---|---|---|"
    "$PY" tools/device_check.py latency "$OUT_DIR"
} >> "$TABLE"
echo
sed 's/^\[device_check\] /- /' "$OUT_DIR/environment.txt"
echo
cat "$TABLE"
say "done in $((SECONDS - start)) s; logs, JSON and table.md in $OUT_DIR"
