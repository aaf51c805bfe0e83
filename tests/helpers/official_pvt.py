"""whai362/PVT v1 and vtpack laid out and computed as the official code does, for the converter
tests: state dicts of the official keys and shapes (random values), and the forward passes
re-implemented from their definitions (explicit softmax(q·kᵀ)·v, vtpack's region loop,
bilinear sampling by hand), meant for float64."""
import torch
from torch.nn import functional as F

DIMS, HEADS, MLP, SR, PATCH = (64, 128, 320, 512), (1, 2, 5, 8), (8, 8, 4, 4), (8, 4, 2, 1), (4, 2, 2, 2)
SMALL, TINY = (3, 4, 6, 3), (2, 2, 2, 2)
POINTS = 4


# ------------------------------------------------------------------ official layouts
def official_pvt_state_dict(depths, img_size=224, cls_token=True, deformable=False, dge_splits=None, seed=0):
    """Keys and shapes of whai362/PVT v1 ``PyramidVisionTransformer`` (vtpack's DPVT with
    ``deformable``: attn.v / attn_weight / offsets and no class token; vtpack's PVT+DGE with
    ``dge_splits``: ``block{s}.{j}.dge.router.gate`` and ``dge.splits``), random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=gen) * scale

    def linear(p, fan_in, fan_out, scale=1.0):
        sd[p + ".weight"] = rnd(fan_out, fan_in, scale=scale * fan_in**-0.5)
        sd[p + ".bias"] = rnd(fan_out, scale=0.1)

    def norm(p, c):
        sd[p + ".weight"] = 1.0 + rnd(c, scale=0.1)
        sd[p + ".bias"] = rnd(c, scale=0.1)

    prev, stride = 3, 1
    for i, depth in enumerate(depths):
        s, c, p = i + 1, DIMS[i], PATCH[i]
        stride *= p
        sd[f"patch_embed{s}.proj.weight"] = rnd(c, prev, p, p, scale=(prev * p * p) ** -0.5)
        sd[f"patch_embed{s}.proj.bias"] = rnd(c, scale=0.1)
        norm(f"patch_embed{s}.norm", c)
        sd[f"pos_embed{s}"] = rnd(1, (img_size // stride) ** 2 + (cls_token and i == 3), c, scale=0.5)
        for j in range(depth):
            b = f"block{s}.{j}"
            norm(b + ".norm1", c)
            if deformable:
                linear(b + ".attn.v", c, c)
                linear(b + ".attn.attn_weight", c, HEADS[i] * POINTS)
                linear(b + ".attn.offsets", c, HEADS[i] * POINTS * 2, scale=2.0)
            else:
                linear(b + ".attn.q", c, c)
                linear(b + ".attn.kv", c, 2 * c)
                if SR[i] > 1:
                    sd[b + ".attn.sr.weight"] = rnd(c, c, SR[i], SR[i], scale=(c * SR[i] ** 2) ** -0.5)
                    sd[b + ".attn.sr.bias"] = rnd(c, scale=0.1)
                    norm(b + ".attn.norm", c)
            linear(b + ".attn.proj", c, c)
            norm(b + ".norm2", c)
            linear(b + ".mlp.fc1", c, c * MLP[i])
            linear(b + ".mlp.fc2", c * MLP[i], c)
            if dge_splits:
                sd[b + ".dge.splits"] = torch.tensor(dge_splits)
                linear(b + ".dge.router.gate", c, len(dge_splits), scale=4.0)
        prev = c
    norm("norm", DIMS[3])
    if cls_token:
        sd["cls_token"] = rnd(1, 1, DIMS[3], scale=0.5)
    linear("head", DIMS[3], 1000)
    return sd


def _ln(x, sd, p, eps):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _mlp(x, sd, p):
    return _lin(F.gelu(_lin(x, sd, p + ".fc1")), sd, p + ".fc2")


def official_sr_attention(sd, p, queries, context, hw, heads, sr):
    """PVT v1 ``Attention.forward``: q from ``queries``, k / v from the (R×R conv + LayerNorm
    reduced) ``context``; explicit softmax(q·kᵀ·d^-½)·v."""
    b, m, c = queries.shape
    d = c // heads
    q = _lin(queries, sd, p + ".q").reshape(b, m, heads, d).permute(0, 2, 1, 3)
    x = context
    if sr > 1:
        x = x.permute(0, 2, 1).reshape(b, c, *hw)
        x = F.conv2d(x, sd[p + ".sr.weight"], sd[p + ".sr.bias"], stride=sr).reshape(b, c, -1).permute(0, 2, 1)
        x = _ln(x, sd, p + ".norm", 1e-5)
    kv = _lin(x, sd, p + ".kv").reshape(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
    attn = ((q @ kv[0].transpose(-2, -1)) * d**-0.5).softmax(dim=-1)
    return _lin((attn @ kv[1]).transpose(1, 2).reshape(b, m, c), sd, p + ".proj")


def official_deformable_attention(sd, p, x, hw, heads):
    """vtpack DPVT ``Attention.forward`` and its CUDA sampler: token (i, j) samples at
    (j, i) + offset in pixel units, bilinearly, zeros outside the map."""
    b, n, c = x.shape
    h, w = hw
    d = c // heads
    value = _lin(x, sd, p + ".v").reshape(b, n, heads, d).permute(0, 2, 1, 3)  # [b, heads, n, d]
    offsets = _lin(x, sd, p + ".offsets").reshape(b, n, heads, POINTS, 2).permute(0, 2, 1, 3, 4)
    weights = _lin(x, sd, p + ".attn_weight").reshape(b, n, heads, POINTS).permute(0, 2, 1, 3).softmax(-1)
    ii, jj = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    loc = torch.stack([jj, ii], dim=-1).reshape(1, 1, n, 1, 2) + offsets  # (x, y)
    x0, y0 = loc[..., 0].floor(), loc[..., 1].floor()
    tx, ty = loc[..., 0] - x0, loc[..., 1] - y0
    out = torch.zeros(b, heads, n, d, dtype=x.dtype)
    for dy in (0, 1):
        for dx in (0, 1):
            xx, yy = x0 + dx, y0 + dy
            wgt = (tx if dx else 1 - tx) * (ty if dy else 1 - ty) * weights
            inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            idx = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).long().reshape(b, heads, n * POINTS)
            taps = value.gather(2, idx[..., None].expand(-1, -1, -1, d)).reshape(b, heads, n, POINTS, d)
            out += ((wgt * inside)[..., None] * taps).sum(dim=3)
    return _lin(out.permute(0, 2, 1, 3).reshape(b, n, c), sd, p + ".proj")


def official_block(sd, p, x, hw, stage, deformable):
    y = _ln(x, sd, p + ".norm1", 1e-6)
    if deformable:
        x = x + official_deformable_attention(sd, p + ".attn", y, hw, HEADS[stage])
    else:
        x = x + official_sr_attention(sd, p + ".attn", y, y, hw, HEADS[stage], SR[stage])
    return x + _mlp(_ln(x, sd, p + ".norm2", 1e-6), sd, p + ".mlp")


def vtpack_dge_block(sd, p, x, hw, stage, extra, choices):
    """vtpack ``pvt_dge`` Block at inference: per S×S region the router (a Linear on the
    region's average, before norm1) picks split k; the k×k patch means and the extra tokens are
    the queries of the block against the dense tokens; each token gets its patch's update."""
    b, n, c = x.shape
    h, w = hw
    splits = sd[p + ".dge.splits"].tolist()
    s = max(splits)
    spatial = x[:, extra:].reshape(b, h, w, c)
    region_means = F.avg_pool2d(spatial.permute(0, 3, 1, 2), s).permute(0, 2, 3, 1)
    choice = _lin(region_means, sd, p + ".dge.router.gate").argmax(-1)
    choices.append(choice)
    out = x.clone()
    for bi in range(b):
        queries, plan = [x[bi, :extra]], []
        for ri in range(h // s):
            for rj in range(w // s):
                k = splits[choice[bi, ri, rj]]
                region = spatial[bi, ri * s : (ri + 1) * s, rj * s : (rj + 1) * s]
                queries.append(region.reshape(k, s // k, k, s // k, c).mean(dim=(1, 3)).reshape(k * k, c))
                plan.append((ri, rj, k))
        q = torch.cat(queries)[None]
        ctx = _ln(x[bi : bi + 1], sd, p + ".norm1", 1e-6)
        y = q + official_sr_attention(sd, p + ".attn", _ln(q, sd, p + ".norm1", 1e-6), ctx, hw, HEADS[stage], SR[stage])
        y = y + _mlp(_ln(y, sd, p + ".norm2", 1e-6), sd, p + ".mlp")
        delta = (y - q)[0]
        out[bi, :extra] += delta[:extra]
        grid = out[bi, extra:].view(h, w, c)
        row = extra
        for ri, rj, k in plan:
            patch = delta[row : row + k * k].reshape(k, 1, k, 1, c).expand(k, s // k, k, s // k, c)
            grid[ri * s : (ri + 1) * s, rj * s : (rj + 1) * s] += patch.reshape(s, s, c)
            row += k * k
    return out


def official_pvt_forward(sd, x, depths, img_size, classify, deformable=False, choices=None):
    """whai362/PVT v1 (vtpack's DPVT / PVT+DGE for ``deformable`` / ``dge.splits`` keys):
    ``classify``: the classification model -> logits; else the detection backbone
    (``detection/pvt.py``: no class token, ``pos_embed4[:, 1:]``, no final norm) -> [res2..res5]."""
    b = x.shape[0]
    with_cls = classify and "cls_token" in sd
    num_patches1 = (img_size // 4) ** 2
    outs = []
    for i, depth in enumerate(depths):
        s, c = i + 1, DIMS[i]
        x = F.conv2d(x, sd[f"patch_embed{s}.proj.weight"], sd[f"patch_embed{s}.proj.bias"], stride=PATCH[i])
        h, w = x.shape[-2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{s}.norm", 1e-5)
        grid = img_size // (4 * 2**i)
        pos = sd[f"pos_embed{s}"]
        extra_pos = pos.shape[1] - grid * grid
        spatial_pos = pos[:, extra_pos:]
        if h * w != num_patches1:  # the official `_get_pos_embed` test (against patch_embed1, in every stage)
            spatial_pos = spatial_pos.reshape(1, grid, grid, c).permute(0, 3, 1, 2)
            spatial_pos = F.interpolate(spatial_pos, size=(h, w), mode="bilinear").reshape(1, c, h * w).permute(0, 2, 1)
        extra = 1 if with_cls and i == 3 else 0
        if extra:
            x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
            spatial_pos = torch.cat([pos[:, :1], spatial_pos], dim=1)
        x = x + spatial_pos
        for j in range(depth):
            p = f"block{s}.{j}"
            if p + ".dge.splits" in sd:
                x = vtpack_dge_block(sd, p, x, (h, w), i, extra, choices)
            else:
                x = official_block(sd, p, x, (h, w), i, deformable)
        outs.append(x[:, extra:].transpose(1, 2).reshape(b, c, h, w))
        if i < 3:
            x = outs[-1]
    if not classify:
        return outs
    x = _ln(x, sd, "norm", 1e-6)
    return _lin(x[:, 0] if with_cls else x.mean(dim=1), sd, "head")
