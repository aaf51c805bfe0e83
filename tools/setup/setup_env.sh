#!/usr/bin/env bash
# One set-up path for the README, CI and every tool: creates or repairs .venv/ at the
# repo root and installs torch, detectron2 (tools/setup/build_detectron2.py), the pinned
# requirements and dge itself (editable). A finished set-up leaves a stamp; a rerun with
# the same inputs checks the stamp and the imports and returns in seconds.
#
#   bash tools/setup/setup_env.sh          # create / repair / reuse .venv
#   DGE_PYTHON=python3.11 bash ...         # choose the interpreter for a new .venv
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.dge-setup-stamp"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

step="start"
fail() {
    echo "" >&2
    echo "[setup] FAILED during: $step" >&2
    echo "[setup] The packages come from PyPI: check that this machine reaches it (pip's" >&2
    echo "[setup] output above says which request failed). Then run the same command again:" >&2
    echo "[setup]     bash tools/setup/setup_env.sh   (or: make setup)" >&2
    echo "[setup] A rerun repairs a partial .venv; 'rm -rf .venv' starts from nothing." >&2
    exit 1
}
trap fail ERR

# The stamp covers everything that decides what gets installed.
stamp_value() {
    cat "$ROOT/requirements.txt" "$ROOT/setup.py" "$ROOT/tools/setup/build_detectron2.py" \
        "$ROOT/tools/setup/detectron2_C_standin.py" "$ROOT/tools/setup/setup_env.sh" \
        | sha256sum | cut -d' ' -f1
}
imports_ok() {
    "$PY" -c "from detectron2.engine import DefaultPredictor; import torch, torchvision, timm, fvcore, pycocotools, cv2, dge" \
        >/dev/null 2>&1
}

cd "$ROOT"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_value)" ]] && imports_ok; then
    echo "[setup] .venv is up to date ($("$PY" -c 'import torch, detectron2; print("torch", torch.__version__, "| detectron2", detectron2.__version__)'))"
    exit 0
fi
rm -f "$STAMP"

step="creating the virtual environment .venv/"
if ! "$PY" -c "import sys, pip" >/dev/null 2>&1; then
    [[ -e "$VENV" ]] && echo "[setup] .venv/ exists but its Python or pip does not run: recreating it"
    rm -rf "$VENV"
    "${DGE_PYTHON:-python3}" -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

step="installing ${TORCH_PINS[*]}"
echo "[setup] $step"
"${PIP[@]}" install --quiet "${TORCH_PINS[@]}"

step="installing requirements.txt"
echo "[setup] $step"
"${PIP[@]}" install --quiet -r requirements.txt "${TORCH_PINS[@]}"

step="installing detectron2 (tools/setup/build_detectron2.py)"
echo "[setup] $step"
"$PY" tools/setup/build_detectron2.py

step="installing dge (pip install -e .)"
echo "[setup] $step"
"${PIP[@]}" install --quiet --no-deps --no-build-isolation -e .

step="checking the imports"
imports_ok || { "$PY" -c "from detectron2.engine import DefaultPredictor; import dge"; false; }
stamp_value > "$STAMP"
echo "[setup] done: $("$PY" -W ignore::FutureWarning -m dge.collect_env --short 2>/dev/null)"
