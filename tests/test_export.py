"""Exported DGE models keep their dynamic routing (``dge.export``): torch.export, ONNX (onnxruntime)
and TorchScript against the eager model on inputs other than the one they were exported with."""
import pytest
import torch

from dge.layers.calibration import randomize_routers
from dge.analysis.export_checks import swap_check
from dge.export import ExportedModel, ExportError, RoutedOutputs, export_module, max_difference, onnxruntime_session
from dge.onnx_ops import FUSED_ATTENTION
from dge.layers import dge_modules
from dge.models import PyramidVisionTransformer
from model_helpers import PATCHED_MODELS, recorded, routed_patched_model

HW = (64, 96)


def tiny_dge_pyramid(attention: str = "sr", global_pool: str = "avg") -> RoutedOutputs:
    """One block per stage, routers that route by content (regions differ per input)."""
    torch.manual_seed(0)
    model = PyramidVisionTransformer(
        img_size=64, num_classes=10, global_pool=global_pool, depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256),
        attention=attention, dge=True,
    ).eval()
    randomize_routers(model, seed=1)
    for m in dge_modules(model):
        torch.nn.init.zeros_(m.router.gate.bias)
    return RoutedOutputs(model).eval()


def inputs(n: int):
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(1, 3, *HW, generator=gen) * (0.5 + i) for i in range(n)]


def query_counts(record) -> list:
    return [int(info.num_queries.sum()) for info in record.infos]


# ONNX goes through torch.export: SR attention in ONNX once, with the class token ("token")
CASES = [(fmt, kind, pool) for fmt in ("exported", "onnx", "torchscript")
         for kind, pool in (("sr", "avg"), ("deformable", "avg"), ("sr", "token")) if (fmt, kind, pool) != ("onnx", "sr", "avg")]


@pytest.mark.parametrize("fmt, attention, global_pool", CASES, ids=["-".join(c) for c in CASES])
def test_an_exported_model_follows_each_inputs_routing(tmp_path, fmt, attention, global_pool):
    if fmt == "onnx":  # requirements.txt installs both; a platform without their wheels skips
        pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
        pytest.importorskip("onnxruntime", reason="running ONNX files needs onnxruntime")
    model = tiny_dge_pyramid(attention, global_pool)
    export_image, *others = inputs(4)
    path = str(tmp_path / f"model.{fmt}")
    meta = export_module(model, export_image, path, fmt)
    assert meta["outputs"][0] == "output" and "dge.beta" in meta["outputs"]
    exported = ExportedModel(path)
    routings = set()
    for x in [export_image] + others:
        with torch.no_grad():
            eager, record = recorded(model, x)
        routings.add(tuple(query_counts(record)))
        out = exported(x)
        assert list(out) == list(eager)
        assert max_difference(eager, out) < 1e-4
        assert float(out["dge.beta"][0]) == pytest.approx(float(eager["dge.beta"][0]), abs=1e-6)
    assert len(routings) == 4  # every input routed differently, none like the export image


def onnx_nodes(path: str) -> list:
    import onnx

    return list(onnx.load(path, load_external_data=False).graph.node)


def fused_attention(path: str) -> list:
    """The ONNX file's fused attention nodes (ONNX Runtime's MultiHeadAttention)."""
    return [n for n in onnx_nodes(path) if (n.domain, n.op_type) == FUSED_ATTENTION]


def test_onnx_attention_is_one_fused_op_and_sessions_are_set_as_documented(tmp_path):
    pytest.importorskip("onnxruntime", reason="running ONNX files needs onnxruntime")
    import onnxruntime

    model, path = tiny_dge_pyramid(), str(tmp_path / "model.onnx")
    export_module(model, inputs(1)[0], path, "onnx")
    fused = fused_attention(path)
    assert len(fused) == 4 and not [n for n in onnx_nodes(path) if n.op_type == "Softmax"]  # one block per stage
    assert {a.name: a.i for a in fused[0].attribute if a.name == "num_heads"} == {"num_heads": 1}
    options = onnxruntime_session(path, threads=2).get_session_options()
    assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.enable_cpu_mem_arena and not options.enable_profiling


def test_onnx_files_run_in_openvino_and_stay_dynamic(tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO runs ONNX files (requirements.txt installs it)")
    model, path = tiny_dge_pyramid(), str(tmp_path / "model.onnx")
    export_image, *others = inputs(4)
    export_module(model, export_image, path, "onnx")  # fused attention and all: OpenVINO reads ONNX Runtime's op
    openvino = ExportedModel(path, runtime="openvino")
    betas = []
    for x in [export_image] + others:
        with torch.no_grad():
            eager = model(x)
        out = openvino(x)
        assert max_difference(eager, out) < 1e-4
        betas.append(float(out["dge.beta"][0]))
    assert len(set(betas)) == 4  # every input routed anew


class _Pools(torch.nn.Module):
    """DGE's patch means (k×k, ceil mode: border patches average their valid tokens) and, as
    ONNX's AveragePool, a pooling of another kind."""

    def forward(self, x):
        means = [torch.nn.functional.avg_pool2d(x, k, ceil_mode=True) for k in (2, 4)]
        return {"2": means[0], "4": means[1], "other": torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)}


def test_onnx_patch_means_are_sums_on_the_channels_last_map(tmp_path):
    pytest.importorskip("onnxruntime", reason="running ONNX files needs onnxruntime")
    x, path = torch.randn(1, 8, 19, 21), str(tmp_path / "pools.onnx")  # 19×21: border patches of 2 and 4 cut
    export_module(_Pools(), x, path, "onnx")
    kinds = [n.op_type for n in onnx_nodes(path)]
    assert kinds.count("AveragePool") == 1 and kinds.count("ReduceSum") == 4
    assert max_difference(ExportedModel(path)(x), _Pools()(x)) < 1e-5


def test_exported_under_all_fine_routing_runs_mixed_routing_and_the_reverse():
    """The graph does not keep the routing it was traced with: traced with every region at
    φ = 1 and run with routers that mix granularities (their weights loaded into the same
    program), and the other way round (``tools/export_model.py --swap-check``)."""
    model = tiny_dge_pyramid()
    example, *others = inputs(3)
    rows = swap_check(model, example, others)
    assert [r["case"] for r in rows] == ["traced all-fine, run as routed", "traced as routed, run all-fine"]
    assert all(r["max_abs_diff"] < 1e-4 for r in rows)
    assert max(rows[0]["betas"]) < 0.95 and min(rows[1]["betas"]) >= 1.0  # mixed, then all φ = 1 (+ routers)
    with torch.no_grad():  # the model keeps its own routers
        assert float(model(example)["dge.share_phi1"][0]) < 0.95


def test_an_input_of_another_size_is_refused_with_the_size_the_export_takes(tmp_path):
    model = tiny_dge_pyramid()
    path = str(tmp_path / "model.pt2")
    export_module(model, inputs(1)[0], path, "exported")
    with pytest.raises(ValueError, match=r"exported for inputs of shape \[1, 3, 64, 96\].*got \[1, 3, 96, 96\]"):
        ExportedModel(path)(torch.randn(1, 3, 96, 96))


def test_an_export_that_stops_names_the_module_and_the_line(tmp_path):
    class HostDecision(torch.nn.Module):
        def forward(self, x):
            if x.mean() > 0:  # a Python branch on a tensor's value
                return x * 2
            return x

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), HostDecision())
    with pytest.raises(ExportError, match=r"exported export stopped in module 'model.1' \(HostDecision\) at .*test_export.py:\d+ `if x.mean\(\) > 0:"):
        export_module(RoutedOutputs(model), torch.randn(1, 3, 8, 8), str(tmp_path / "m.pt2"), "exported")


def test_a_batch_cannot_be_exported_with_dge_blocks(tmp_path):
    model = tiny_dge_pyramid()
    with pytest.raises(ValueError, match="batch 1"):
        export_module(model, torch.randn(2, 3, *HW), str(tmp_path / "m.pt2"), "exported")
    with pytest.raises(RuntimeError, match="batch 1 only"):
        torch.jit.trace(model.model, torch.randn(2, 3, *HW), check_trace=False)


def test_skipping_granularity_without_extra_tokens_is_refused_with_a_reason(tmp_path):
    torch.manual_seed(0)
    model = PyramidVisionTransformer(
        img_size=64, num_classes=0, global_pool="avg", depths=(1, 1, 1, 1), embed_dims=(32, 64, 160, 256),
        dge=dict(granularities=(0, 1, 2, 4)),
    ).eval()
    with pytest.raises(ExportError, match=r"DynamicGrainedEncoder.*0 in its granularities \(0, 1, 2, 4\).*keep no query"):
        export_module(RoutedOutputs(model), inputs(1)[0], str(tmp_path / "m.pt2"), "exported")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", sorted(PATCHED_MODELS))
def test_patched_models_export_to_onnx_and_torchscript_and_stay_dynamic(tmp_path, case, fmt):
    """Exported at one image's routing, each file runs another image's routing as eager does
    (onnxruntime for ONNX), β included."""
    model, x = routed_patched_model(case, batch=2)
    with torch.no_grad():
        wrapped = RoutedOutputs(model)
        export_module(wrapped, x[:1], str(tmp_path / f"model.{fmt}"), fmt)
        exported = ExportedModel(str(tmp_path / f"model.{fmt}"))
        outputs = [(exported(image), wrapped(image)) for image in (x[:1], x[1:])]
    assert all(max_difference(a, b) <= 1e-5 for a, b in outputs)
    assert not torch.equal(outputs[0][1]["dge.beta"], outputs[1][1]["dge.beta"])
    if fmt == "onnx":  # every attention (DGE's queries, windows with their bias, vanilla blocks) as one fused op
        assert len(fused_attention(str(tmp_path / "model.onnx"))) >= len(dge_modules(model))
