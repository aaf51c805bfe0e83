#!/usr/bin/env bash
# Runs the test suite against a detectron2 built from source (what GPU users have) instead
# of the patched pb1 v0.6 build in .venv, without touching .venv:
#
#   bash tools/setup/test_detectron2_source.sh /path/to/detectron2-checkout [pytest args]
#
# It makes a second virtual environment (default /tmp/dge-d2src-venv, or $DGE_D2SRC_VENV)
# that sees .venv's packages (torch, fvcore, timm, ...) through a .pth file, builds the
# checkout there with its C++ ops (--no-build-isolation, against .venv's torch; about a
# minute on 2 cores without CUDA) and runs pytest with it. Needs .venv (make setup) and a
# C++ compiler.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SRC="${1:?usage: $0 /path/to/detectron2-checkout [pytest args]}"
shift
VENV="${DGE_D2SRC_VENV:-/tmp/dge-d2src-venv}"
MAIN_PY="$ROOT/.venv/bin/python"

[ -x "$MAIN_PY" ] || { echo "no .venv: run 'make setup' first" >&2; exit 1; }
[ -f "$SRC/setup.py" ] && [ -d "$SRC/detectron2" ] || { echo "$SRC is not a detectron2 checkout" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
    BASE="$("$MAIN_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
    "$BASE" -m venv "$VENV"
fi
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$MAIN_PY" -c 'import site; print(site.getsitepackages()[0])' > "$SITE/zz_dge_main_venv.pth"
"$VENV/bin/python" -m pip install -q wheel
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation --force-reinstall "$SRC"
"$VENV/bin/python" - <<'EOF'
import detectron2
import detectron2._C as C
print(f"[d2src] detectron2 {detectron2.__version__} from {detectron2.__file__}; compiled ops: {C.__file__}")
EOF
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
