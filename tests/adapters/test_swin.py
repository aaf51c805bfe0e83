"""Swin under DGE (``dge.adapters.swin``): regular and shifted windows against a slow loop over
queries and keys (the rolled map, zero-padded windows, the shifted window's mask, the
relative-position bias at each pooled query's centre: v1's table interpolated bilinearly by
hand, v2's position MLP evaluated there), on random routing, odd map sizes and padding; the
granularities a window takes."""
import math

import pytest
import timm
import torch
from timm.models import swin_transformer as swin
from timm.models import swin_transformer_v2 as swin2
from torch.nn import functional as F

import dge
from dge.adapters.swin import SwinAdapter, SwinV2Adapter
from dge.layers import DynamicGrainedEncoder
from model_helpers import max_diff, reference_dge

DIM, HEADS, HW = 32, 2, (11, 13)  # windows padded to 16×16 (windows of 8) or 14×14 (of 7)


def swin_block(version: int, window: int, shift: int, seed: int = 0):
    """A Swin block with random weights, tables, position MLP and logit scales."""
    torch.manual_seed(seed)
    cls = swin.SwinTransformerBlock if version == 1 else swin2.SwinTransformerV2Block
    block = cls(DIM, HW, num_heads=HEADS, window_size=window, shift_size=shift, mlp_ratio=2.0)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.15)
        if version == 2:
            block.attn.logit_scale.fill_(math.log(5.0))
    return block.eval()


class SlowSwin:
    """forward_queries of a Swin block on the rolled map, one query and one key at a time."""

    def __init__(self, block):
        self.block, self.v2 = block, isinstance(block, swin2.SwinTransformerV2Block)
        self.window = tuple(block.window_size)

    def keys(self, context: torch.Tensor):
        wh, ww = self.window
        tokens = context[0] if self.v2 else self.block.norm1(context[0])
        grid = tokens.view(HW[0], HW[1], -1)
        return F.pad(grid, (0, 0, 0, -HW[1] % ww, 0, -HW[0] % wh))  # zeros after the norm

    def bias(self, dy: float, dx: float, head: int) -> torch.Tensor:
        (wh, ww), attn = self.window, self.block.attn
        if self.v2:  # the position MLP at the fractional offset, timm's log-spaced coordinates
            c = torch.tensor([dy / (wh - 1), dx / (ww - 1)]) * 8
            c = torch.sign(c) * torch.log2(c.abs() + 1.0) / math.log2(8)
            return 16 * torch.sigmoid(attn.cpb_mlp(c)[head])
        table = attn.relative_position_bias_table[:, head].view(2 * wh - 1, 2 * ww - 1)
        y, x = dy + wh - 1, dx + ww - 1
        y0, x0 = min(math.floor(y), 2 * wh - 3), min(math.floor(x), 2 * ww - 3)
        fy, fx = y - y0, x - x0
        return ((1 - fy) * (1 - fx) * table[y0, x0] + (1 - fy) * fx * table[y0, x0 + 1]
                + fy * (1 - fx) * table[y0 + 1, x0] + fy * fx * table[y0 + 1, x0 + 1])

    def attention(self, query: torch.Tensor, keys: torch.Tensor, center, origin, mask_row) -> torch.Tensor:
        attn, d = self.block.attn, DIM // HEADS
        bias = attn.qkv.bias if not self.v2 else torch.cat([attn.q_bias, attn.k_bias, attn.v_bias])
        q = F.linear(query, attn.qkv.weight[:DIM], bias[:DIM])
        kv = F.linear(keys, attn.qkv.weight[DIM:], bias[DIM:])
        out = []
        for h in range(HEADS):
            qh, kh, vh = q[h * d:(h + 1) * d], kv[:, h * d:(h + 1) * d], kv[:, DIM + h * d:DIM + (h + 1) * d]
            logits = []
            for j, key in enumerate(kh):
                ky, kx = divmod(j, self.window[1])
                if self.v2:
                    scale = torch.clamp(attn.logit_scale[h, 0, 0], max=math.log(100.0)).exp()
                    logit = F.cosine_similarity(qh, key, dim=0, eps=1e-12) * scale
                else:
                    logit = qh @ key * d ** -0.5
                dy, dx = center[0] - origin[0] - 0.5 - ky, center[1] - origin[1] - 0.5 - kx
                logits.append(logit + self.bias(dy, dx, h) + mask_row[j])
            out.append(torch.stack(logits).softmax(0) @ vh)
        return attn.proj(torch.cat(out))

    def forward_queries(self, queries, context, hw, centers, rows=None):
        b, (wh, ww) = self.block, self.window
        keys, mask = self.keys(context), self.mask()
        out = []
        for query, (cy, cx) in zip(queries[0], centers[0].tolist()):
            oy, ox = int(cy // wh) * wh, int(cx // ww) * ww
            slot = (int(cy) - oy) * ww + (int(cx) - ox)
            window_index = (oy // wh) * (keys.shape[1] // ww) + ox // ww
            row = mask[window_index, slot] if mask is not None else torch.zeros(wh * ww)
            window = keys[oy:oy + wh, ox:ox + ww].reshape(wh * ww, -1)
            if self.v2:
                x = query + b.norm1(self.attention(query, window, (cy, cx), (oy, ox), row))
                out.append(x + b.norm2(b.mlp(x)))
            else:
                x = query + self.attention(b.norm1(query), window, (cy, cx), (oy, ox), row)
                out.append(x + b.mlp(b.norm2(x)))
        return torch.stack(out)[None]

    def mask(self):
        return self.block.attn_mask


CASES = [(1, 8, 0, (1, 2, 4)), (1, 8, 4, (1, 2, 4)), (1, 7, 3, (1, 7)), (2, 8, 4, (1, 2, 4))]


@pytest.mark.parametrize("version, window, shift, phi", CASES, ids=["v1", "v1-shifted", "v1-w7-shifted", "v2-shifted"])
def test_swin_dge_equals_a_slow_loop_over_queries_and_keys(version, window, shift, phi):
    """Random maps on an 11×13 map (padded windows; regions cut at the border), batch 2: the
    DGE block on the map (rolled, routed, rolled back) against the loop on the rolled tokens."""
    block = swin_block(version, window, shift)
    adapter = (SwinAdapter if version == 1 else SwinV2Adapter)(block)
    layer = DynamicGrainedEncoder(adapter, DIM, dict(granularities=phi)).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, *HW, DIM, generator=gen)
    region = max(phi)
    grid = (-(-HW[0] // region), -(-HW[1] // region))
    gmap = torch.tensor(phi)[torch.randint(0, len(phi), (2, *grid), generator=gen)]
    rolled = torch.roll(x, (-shift, -shift), (1, 2)).flatten(1, 2)
    with torch.no_grad():
        out = layer(x, granularity_map=gmap)
        reference = reference_dge(SlowSwin(block), rolled, HW, gmap, region=region).view(x.shape)
        reference = torch.roll(reference, (shift, shift), (1, 2))
        assert max_diff(out, reference) <= 1e-5
        assert max_diff(layer(x, granularity_map=torch.ones_like(gmap)), block(x)) <= 1e-5  # all-fine: the block


def test_windows_of_7_take_region_size_7_and_the_message_names_what_fits():
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=32, depths=(2, 2), num_heads=(1, 2),
                              img_size=(64, 64))
    with pytest.raises(ValueError, match=r"region size 4 does not divide stage 0 block 0's window 7x7.*\(1, 7\)"):
        dge.patch(model)
    dge.patch(model, dict(granularities=(1, 7)))
    assert all(b.region_size == 7 for b in dge.dge_modules(model))


def test_fit_to_windows_gives_each_block_what_tiles_its_window():
    """SAM 2's windows of 8, 4, 14 and 7 under Φ = {1, 2, 4}: {1, 2, 4} where 4 tiles the
    window, {1, 2} in windows of 14, a global block {1, 2, 4}, windows of 7 kept dense."""
    fit = dge.adapters.fit_to_windows(dict(granularities=(1, 2, 4)))
    assert fit("a", (8, 8)).granularities == (1, 2, 4) and fit("a", None).granularities == (1, 2, 4)
    assert fit("b", (14, 14)).granularities == (1, 2) and fit("b", (14, 14)).region_size == 2
    assert fit("c", (7, 7)) is None
    assert fit("d", (4, 4)).region_size is None  # as given
