"""Install detectron2 v0.6 from the ``pb1-detectron2`` sdist, without its C++ extension.

detectron2 is not on PyPI. ``pb1-detectron2==0.6`` is a byte-for-byte copy of detectron2
v0.6's Python sources without its C++ sources, so its setup.py cannot build the extension,
and v0.6 predates three removals in its dependencies. This script, run with the
environment's own Python, downloads the sdist (hash-pinned), applies the small patch below
and installs it with ``--no-deps`` (dge's requirements.txt pins what v0.6 needs):

* setup.py: the extension is left out (``ext_modules=[]``);
* NumPy >= 1.24 removed ``np.bool/np.int/np.float/np.str/np.object``: use the builtins;
* Pillow >= 10 removed ``Image.LINEAR``: ``Image.BILINEAR`` is the same filter;
* setuptools >= 81 removed ``pkg_resources``: model_zoo uses ``importlib.resources``;
* ``detectron2/_C.py``: a stand-in module so that every detectron2 module imports, and
  every compiled op raises a clear error naming the op (``detectron2_C_standin.py``).

Usage: ``python tools/setup/build_detectron2.py`` (idempotent: a detectron2 that is
already importable with compiled ops, or this patched build, is kept);
``python tools/setup/build_detectron2.py --wheel-dir DIR`` writes the patched build as a
wheel instead of installing it.
"""
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "pb1-detectron2==0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
HERE = Path(__file__).resolve().parent

# (file, regex, replacement): every source edit of the patch, in one table.
SOURCE_PATCHES = [
    (r"detectron2/.*\.py", r"\bnp\.(bool|int|float|str|object)\b(?!_|\d)", r"\1"),
    (r"detectron2/data/transforms/transform\.py", r"Image\.LINEAR\b", "Image.BILINEAR"),
    (r"detectron2/model_zoo/model_zoo\.py", r"^import pkg_resources$", "import importlib.resources"),
    (
        r"detectron2/model_zoo/model_zoo\.py",
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\", (os\.path\.join\(\"configs\", config_path\))\s*\)",
        r'str(importlib.resources.files("detectron2.model_zoo").joinpath(\1))',
    ),
    (r"setup\.py", r"ext_modules=get_extensions\(\),", "ext_modules=[],"),
    # caffe2 export needs a torch built with caffe2 (gone from current torch): import it only
    # when present, as current detectron2 does (detectron2.utils.analysis imports export).
    (
        r"detectron2/export/__init__\.py",
        r"^from \.api import \*$",
        "try:\n    from caffe2.proto import caffe2_pb2 as _tmp  # noqa\n"
        "except ImportError:\n    pass\nelse:\n    from .api import *",
    ),
]

def _patch_mark() -> str:
    """First line of the installed detectron2/_C.py: names this patch by a hash of its edits
    and the stand-in, so that a changed patch gets rebuilt."""
    digest = hashlib.sha256(repr(SOURCE_PATCHES).encode() + (HERE / "detectron2_C_standin.py").read_bytes())
    return f"# patched by dge tools/setup/build_detectron2.py, patch {digest.hexdigest()[:12]}"


def log(msg: str) -> None:
    print(f"[build_detectron2] {msg}", flush=True)


def installed_detectron2() -> str:
    """'compiled', 'patched' (by this patch), 'outdated' (by an older patch), 'broken' or
    'missing' for the detectron2 in this Python."""
    probe = (
        "import detectron2, detectron2._C as C, detectron2.engine, detectron2.evaluation, detectron2.export;"
        "print('patched' if getattr(C, 'IS_STANDIN', False) else 'compiled', C.__file__)"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if r.returncode == 0:
        state, path = r.stdout.strip().splitlines()[-1].split(" ", 1)
        if state == "patched" and Path(path).read_text().splitlines()[0] != _patch_mark():
            return "outdated"
        return state
    r = subprocess.run([sys.executable, "-c", "import detectron2"], capture_output=True)
    return "broken" if r.returncode == 0 else "missing"


def patch_sources(src: Path) -> int:
    """Apply SOURCE_PATCHES in the unpacked sdist ``src``; returns the number of edits."""
    edits = 0
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        text = path.read_text()
        new = text
        for pattern, regex, repl in SOURCE_PATCHES:
            if re.fullmatch(pattern, rel):
                new, n = re.subn(regex, repl, new, flags=re.MULTILINE)
                edits += n
        if new != text:
            path.write_text(new)
    if "ext_modules=[]," not in (src / "setup.py").read_text():
        raise RuntimeError("could not remove the C++ extension from pb1-detectron2's setup.py")
    standin = (HERE / "detectron2_C_standin.py").read_text()
    (src / "detectron2" / "_C.py").write_text(f"{_patch_mark()}\n{standin}")
    return edits


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def patched_sources(tmp: str) -> Path:
    """Downloads the sdist (hash-pinned) into ``tmp``, unpacks and patches it: the source folder."""
    req = Path(tmp, "req.txt")
    req.write_text(f"{SDIST} --hash=sha256:{SDIST_SHA256}\n")
    # --no-build-isolation: the sdist's setup.py imports torch even to read metadata.
    pip("download", "--quiet", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
        "--require-hashes", "-r", str(req), "-d", tmp)
    archive = next(Path(tmp).glob("pb1-detectron2-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    src = next(p for p in Path(tmp).iterdir() if p.is_dir())
    edits = patch_sources(src)
    log(f"patched {edits} lines of detectron2 v0.6 and added the detectron2._C stand-in")
    return src


def build_wheel(folder: str) -> int:
    """Writes the patched detectron2 v0.6 as a pure-Python wheel into ``folder`` (for a machine
    without a package index: tools/setup/gpu_wheels.sh)."""
    with tempfile.TemporaryDirectory(prefix="pb1-detectron2-") as tmp:
        src = patched_sources(tmp)
        pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", folder, str(src))
    log(f"wrote the patched detectron2 v0.6 wheel into {folder}")
    return 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--wheel-dir":
        return build_wheel(sys.argv[2])
    if len(sys.argv) > 1:
        raise SystemExit(f"usage: {sys.argv[0]} [--wheel-dir DIR]; got {sys.argv[1:]}")
    state = installed_detectron2()
    if state in ("compiled", "patched"):
        log(f"detectron2 is already installed ({state} ops); keeping it")
        return 0
    if state in ("broken", "outdated"):
        log(f"the installed detectron2 is {state} (does not import completely, or an older patch); reinstalling it")
    with tempfile.TemporaryDirectory(prefix="pb1-detectron2-") as tmp:
        src = patched_sources(tmp)
        pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--force-reinstall", str(src))
        shutil.rmtree(src, ignore_errors=True)
    state = installed_detectron2()
    if state != "patched":
        raise RuntimeError(f"detectron2 did not import after the build (state: {state})")
    log("detectron2 v0.6 installed (without compiled ops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
