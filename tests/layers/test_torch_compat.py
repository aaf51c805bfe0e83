"""dge on the torch its users have: without the newer APIs it falls back instead of failing.
Here a torch without ``torch.nn.attention.varlen`` (torch < 2.10) is made by hiding that
module in a fresh interpreter; a DGE block then gives what it gives with it."""
import importlib.util
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    if HIDE:
        class Hide(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch.nn.attention.varlen":
                    raise ImportError("hidden: torch < 2.10 has no " + name)
        sys.meta_path.insert(0, Hide())
    import torch
    from dge.layers import DynamicGrainedEncoder, EncoderBlock, SpatialReductionAttention
    from dge.layers import kernels as attention
    print("varlen", attention.varlen_attn is not None)
    torch.manual_seed(0)
    layer = DynamicGrainedEncoder(EncoderBlock(32, SpatialReductionAttention(32, 2, sr_ratio=2)), 32).train()
    torch.nn.init.normal_(layer.router.gate.weight, std=1.0)
    x = torch.randn(2, 24 * 24, 32, requires_grad=True)
    y = layer(x, (24, 24))
    y.square().sum().backward()
    print("sums", repr(y.sum().item()), repr(x.grad.abs().sum().item()), repr(layer.router.gate.weight.grad.abs().sum().item()))
    """
)


def run(hide: bool) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", f"HIDE = {hide}\n" + SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split(" ", 1) for line in done.stdout.splitlines())


def test_a_torch_without_varlen_attention_runs_the_padded_path():
    hidden, present = run(hide=True), run(hide=False)
    assert hidden["varlen"] == "False"
    assert present["varlen"] == str(importlib.util.find_spec("torch.nn.attention.varlen") is not None)
    assert hidden["sums"] == present["sums"]  # on the CPU both take the padded path: the same numbers
