#!/usr/bin/env bash
# Writes into DIR every wheel dge needs beyond torch, torchvision, timm, numpy and opencv, for
# a machine that has those but no package index (the GPU machine: Python 3.12, torch 2.11):
#
#   bash tools/setup/gpu_wheels.sh DIR [PYTHON_VERSION ...]   # default: 3.12 and this .venv's Python
#
# The patched detectron2 v0.6 (tools/setup/build_detectron2.py --wheel-dir), its pure-Python
# dependencies and pytest at the versions .venv has (the set-up's pins), and pycocotools and
# PyYAML built for each PYTHON_VERSION (manylinux x86_64). Install there without an index:
#
#   python3 -m pip install --no-index --no-deps --find-links DIR --target SITE $(names in DIR)
#
# (tools/device_check.sh does this with DGE_WHEELS=DIR). Needs .venv (make setup) and PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${1:?usage: $0 DIR [PYTHON_VERSION ...]}"
shift
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "no .venv: run 'make setup' first" >&2; exit 1; }
VERSIONS=("$@")
[[ ${#VERSIONS[@]} -gt 0 ]] || VERSIONS=(3.12 "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')")
PURE=(fvcore iopath yacs omegaconf hydra-core antlr4-python3-runtime termcolor tabulate portalocker
      cloudpickle tqdm pytest pluggy iniconfig pygments)
COMPILED=(pycocotools PyYAML)
pinned() {  # NAME==VERSION as installed in .venv
    "$PY" -c 'import sys; from importlib.metadata import version as v; print(" ".join(f"{n}=={v(n)}" for n in sys.argv[1:]))' "$@"
}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl
"$PY" "$ROOT/tools/setup/build_detectron2.py" --wheel-dir "$DIR"
# shellcheck disable=SC2046
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" $(pinned "${PURE[@]}")
for version in $(printf '%s\n' "${VERSIONS[@]}" | sort -u); do
    # shellcheck disable=SC2046
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest "$DIR" $(pinned "${COMPILED[@]}")
done
ls -1 "$DIR"
echo "[gpu_wheels] $(ls "$DIR"/*.whl | wc -l) wheels, $(du -sh "$DIR" | cut -f1) in $DIR (Python ${VERSIONS[*]})"
