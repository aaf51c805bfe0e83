"""dge the library: the core imports and works with torch, timm and numpy alone, no package
imports one above it, and the wheel says what it is."""
import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections import defaultdict
from typing import Dict, Set, Tuple

import pytest

from repo import ROOT

PACKAGE = ROOT / "dge"

# What the core must not need: detectron2 and the heavy dependencies of the other layers.
HEAVY = (
    "detectron2", "fvcore", "iopath", "yacs", "pycocotools", "cv2", "matplotlib", "onnx", "onnxruntime",
    "onnxscript", "openvino", "skimage", "scipy", "tensorboard", "tqdm", "tabulate",
)
# The layers, lowest first: a module imports only from its own package or from lower ranks.
RANKS = {
    "dge.files": 0,
    "dge.layers": 0,
    "dge.models": 1,
    "dge.adapters": 1,
    "dge.export": 2,
    "dge.onnx_ops": 2,
    "dge.config": 3,
    "dge.detectron2": 3,
    "dge.analysis": 4,
    "dge.classification": 5,
    "dge.collect_env": 6,
    "dge": 6,
}
CORE = ("dge.files", "dge.layers", "dge.models", "dge.adapters")

CORE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    HEAVY = set(sys.argv[1].split(","))
    for name in HEAVY:  # as if not installed: import raises ModuleNotFoundError, find_spec gives None
        sys.modules[name] = None
    import timm, torch
    import dge
    from dge.layers import BudgetLoss, complexity_report, record_routing
    from dge.layers.calibration import calibrate, randomize_routers

    torch.manual_seed(0)
    model = dge.patch(timm.create_model("vit_small_patch16_224", img_size=64, depth=2, num_classes=3)).eval()
    x = torch.randn(2, 3, 64, 64)
    randomize_routers(model)
    with torch.no_grad():
        calibrate(model, lambda: model(x), 0.5, steps=10)  # routers at β ≈ 0.5
        with record_routing() as record:
            model(x)
    beta = complexity_report(record, model).beta
    model.train()
    with record_routing() as record:
        logits = model(x)
    budget, stats = BudgetLoss(budget=0.5)(model, record)
    loss = logits.logsumexp(dim=1).mean() + budget
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if ".router." in n]
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    dge.unpatch(model)
    print(json.dumps({
        "beta": beta.tolist(),
        "router_grads": len(grads) and all(g is not None and g.abs().sum() > 0 for g in grads),
        "unpatched": not dge.is_patched(model) and type(model.blocks[0]).__name__ == "Block",
        "heavy_loaded": sorted(m for m, v in sys.modules.items() if m.split(".")[0] in HEAVY and v is not None),
        "dge_modules": sorted(m for m in sys.modules if m == "dge" or m.startswith("dge.")),
    }))
    try:
        dge.Predictor
    except ModuleNotFoundError as exc:
        print(json.dumps({"predictor": str(exc)}))
    """
)


def test_the_core_runs_with_torch_and_timm_alone():
    """With every heavy dependency made unimportable (None in sys.modules, as Python marks a
    module that must not import): import dge, patch a timm ViT, route it, take β (Eq. 7), one
    training step with the budget loss, unpatch. A failure shows the traceback: the module of
    dge that imported what the core must not need, and the line."""
    done = subprocess.run(
        [sys.executable, "-c", CORE_SCRIPT, ",".join(HEAVY)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result, predictor = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert sum(result["beta"]) / 2 == pytest.approx(0.5, abs=0.05) and result["router_grads"] and result["unpatched"]
    assert result["heavy_loaded"] == []
    assert "dge.detectron2" not in result["dge_modules"] and "dge.analysis.flops" not in result["dge_modules"]
    assert "dge.Predictor (dge.detectron2.engine) needs detectron2" in predictor["predictor"]


def _group(module: str) -> str:
    """The entry of RANKS a module belongs to (its longest matching prefix)."""
    return max((g for g in RANKS if module == g or module.startswith(g + ".")), key=len)


def _imports() -> Dict[str, Set[Tuple[str, int]]]:
    """module -> {(imported module, line)} of every import in dge, at the top or in a function."""
    found = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if parts[-1] == "__init__" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found[module].update((a.name, node.lineno) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found[module].add((target, node.lineno))
                if not node.module:  # "from . import x": the submodules
                    found[module].update((f"{target}.{a.name}", node.lineno) for a in node.names)
    return found


def upward_imports(imports) -> list:
    return sorted(
        f"{m}:{line} imports {t} (rank {RANKS[_group(t)]} > {RANKS[_group(m)]})"
        for m, targets in imports.items()
        for t, line in targets
        if (t == "dge" or t.startswith("dge.")) and _group(t) != _group(m) and RANKS[_group(t)] > RANKS[_group(m)]
    )


def heavy_imports_of_the_core(imports) -> list:
    """Imports of HEAVY packages by any module the core reaches through dge's own imports."""
    reach = [m for m in imports if _group(m) in CORE]
    seen = set(reach)
    while reach:
        for target, _ in imports.get(reach.pop(), ()):
            if target in imports and target not in seen and target != "dge":
                seen.add(target)
                reach.append(target)
    return sorted(f"{m}:{line} imports {t}" for m in seen for t, line in imports[m] if t.split(".")[0] in HEAVY)


def test_no_package_imports_one_above_it_and_the_core_reaches_no_heavy_import():
    imports = _imports()
    assert {_group(m) for m in imports} == set(RANKS)  # every package has a rank
    assert upward_imports(imports) == []
    assert heavy_imports_of_the_core(imports) == []


def test_the_layering_check_finds_an_upward_import_and_a_heavy_import_in_reach():
    """The checks above can fail: a core module that imported dge.detectron2 or cv2 would be named."""
    imports = _imports()
    imports["dge.layers.encoder"] = imports["dge.layers.encoder"] | {("dge.detectron2.engine", 7)}
    assert upward_imports(imports) == ["dge.layers.encoder:7 imports dge.detectron2.engine (rank 3 > 0)"]
    imports["dge.models.pvt"] = imports["dge.models.pvt"] | {("dge.config", 3)}
    assert "dge.config:7 imports detectron2.config" in heavy_imports_of_the_core(imports)


def test_no_file_of_the_package_is_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_the_core_requirements_are_torch_timm_and_numpy_and_the_rest_are_extras():
    spec = importlib.util.spec_from_file_location("dge_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # setup() itself runs under __main__ only
    meta = setup_module.METADATA
    assert sorted(r.split(">")[0].split("=")[0] for r in meta["install_requires"]) == ["numpy", "timm", "torch"]
    assert {"detectron2", "analysis", "export", "test", "all"} <= set(meta["extras_require"])
    assert meta["license"] and meta["description"] and meta["project_urls"]
