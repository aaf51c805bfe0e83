"""Every config key dge adds to detectron2's config, with its default."""
import difflib
import re
import warnings
from typing import Sequence

from detectron2.config import CfgNode as CN

from dge.layers import BudgetLoss, DGEOptions

_DGE, _BUDGET = DGEOptions(), BudgetLoss()  # the DGE defaults' one home


def add_dge_config(cfg: CN) -> CN:
    """Add the MODEL.PVT, MODEL.VIT, MODEL.TIMM, MODEL.DGE, SOLVER, INPUT and DATALOADER keys to
    ``cfg`` (in place) and return it."""
    _add_backbone_keys(cfg)
    _add_dge_keys(cfg)
    _add_training_keys(cfg)
    return cfg


def _add_backbone_keys(cfg: CN) -> None:
    cfg.MODEL.PVT = CN()
    # Model size: "tiny", "small", "medium" or "large" (PVT v1 hyper-parameters).
    cfg.MODEL.PVT.SIZE = "small"
    # Vanilla attention: "sr" (PVT, spatial-reduction) or "deformable" (DPVT).
    cfg.MODEL.PVT.ATTENTION = "sr"
    # Sampling points per head of deformable attention (DPVT).
    cfg.MODEL.PVT.NUM_POINTS = 4
    # Stages returned by the backbone, among res2 (stride 4) ... res5 (stride 32).
    cfg.MODEL.PVT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stochastic depth rate, linearly increasing over blocks.
    cfg.MODEL.PVT.DROP_PATH_RATE = 0.1
    # Freeze the patch embedding (1) and the first stages (2..4 = up to res2..res4); 0 trains all.
    cfg.MODEL.PVT.FREEZE_AT = 0
    # Input size whose position-embedding grid the weights carry (224 official PVT, 256 vtpack).
    cfg.MODEL.PVT.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.VIT = CN()  # the plain ViT of build_vitdet_backbone (ViTDet's design)
    # Model size: "tiny", "small", "base", "large" or "huge" (width, depth, heads, global blocks).
    cfg.MODEL.VIT.SIZE = "base"
    # Blocks (0: the size's depth).
    cfg.MODEL.VIT.DEPTH = 0
    # Indices of the global-attention blocks ([]: the size's, evenly spaced); the others are windowed.
    cfg.MODEL.VIT.GLOBAL_BLOCKS = []
    # Window size of the windowed blocks, in patches (ViTDet: 14; a DGE region size must divide it).
    cfg.MODEL.VIT.WINDOW_SIZE = 14
    # Input size of the position embedding and the global blocks' relative-position tables.
    cfg.MODEL.VIT.PRETRAIN_IMG_SIZE = 1024
    # Stochastic depth rate, linearly increasing over blocks (ViTDet-B: 0.1).
    cfg.MODEL.VIT.DROP_PATH_RATE = 0.1
    # Per-channel layer scales in every block (DeiT III and DINOv2 checkpoints carry them).
    cfg.MODEL.VIT.LAYER_SCALE = False
    cfg.MODEL.TIMM = CN()  # any timm model (build_timm_backbone / build_timm_fpn_backbone)
    # timm model name, e.g. "swin_tiny_patch4_window7_224", "pvt_v2_b2", "sam2_hiera_base_plus".
    cfg.MODEL.TIMM.NAME = "pvt_v2_b2"
    # Maps taken (indices into the model's feature_info: stages, or blocks of a plain ViT), named res{log2 stride}.
    cfg.MODEL.TIMM.OUT_INDICES = [0, 1, 2, 3]
    # Stochastic depth rate of the timm model.
    cfg.MODEL.TIMM.DROP_PATH_RATE = 0.1
    # Other keyword arguments of timm.create_model, e.g. {dynamic_img_size: True} for Swin and ViTs.
    cfg.MODEL.TIMM.KWARGS = CN(new_allowed=True)
    # Each DGE block gets the largest region size that tiles its window (dge.adapters.fit_to_windows; SAM 2).
    cfg.MODEL.TIMM.FIT_WINDOWS = False
    # Load MODEL.WEIGHTS giving the backbone < 10% of its tensors or trained under other Φ / S / routing (else an error).
    cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = False


def _add_dge_keys(cfg: CN) -> None:
    cfg.MODEL.DGE = CN()
    # Wrap every encoder block of the backbone in a Dynamic Grained Encoder.
    cfg.MODEL.DGE.ENABLED = False
    # Φ, candidate granularities (patch sides in tokens); 0 means "skip the region".
    cfg.MODEL.DGE.GRANULARITIES = list(_DGE.granularities)
    # S, region side in tokens; 0 uses max(Φ).
    cfg.MODEL.DGE.REGION_SIZE = _DGE.region_size or 0
    # "region" (per S×S region) or "layer" (one granularity per feature map, Table 1).
    cfg.MODEL.DGE.ROUTING = _DGE.routing
    # τ, temperature of the Gumbel-softmax score (Eq. 5).
    cfg.MODEL.DGE.GUMBEL_TAU = _DGE.gumbel_tau
    # Router gradients in training: "paper" (Eq. 6-7), "official" (vtpack: all K computed), "official_sparse".
    cfg.MODEL.DGE.ESTIMATOR = _DGE.estimator
    # Initial router probability of the finest granularity.
    cfg.MODEL.DGE.INIT_FINE_PROB = _DGE.init_fine_prob
    # γ, target complexity ratio of the budget loss (Eq. 8).
    cfg.MODEL.DGE.BUDGET = _BUDGET.budget
    # λ, weight of the budget loss (Eq. 8).
    cfg.MODEL.DGE.BUDGET_WEIGHT = _BUDGET.weight
    # β target whose calibrated router offsets (tools/calibrate_budget.py) inference uses; 0: as trained.
    cfg.MODEL.DGE.INFERENCE_BUDGET = 0.0
    # Learning rate of the routers relative to SOLVER.BASE_LR (1.0: the paper's single rate).
    cfg.MODEL.DGE.ROUTER_LR_FACTOR = 1.0


def _add_training_keys(cfg: CN) -> None:
    # ---------------------------------------------------------------- solver
    # "AdamW" (the paper's recipes) or "SGD"; norms, position embeddings, class tokens, router biases never decay.
    cfg.SOLVER.OPTIMIZER = "AdamW"
    # (β1, β2) of AdamW.
    cfg.SOLVER.BETAS = (0.9, 0.999)
    # p of LR_SCHEDULER_NAME "WarmupPolyLR", BASE_LR·(1 − iter / MAX_ITER)^p (name as detectron2's DeepLab).
    cfg.SOLVER.POLY_LR_POWER = 0.9
    # TF32 in float32 matmuls and convolutions on Ampere+ GPUs (train_net.py): faster, ~1e-3 error per op.
    cfg.SOLVER.TF32 = False

    # ---------------------------------------------------------------- Semantic FPN
    # Dropout2d before the classifier of SemanticFPNHead (mmsegmentation's FPNHead: 0.1).
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # ------------------------------------------------ training input of sem-seg datasets (train_net.py)
    # (r_min, r_max): fit images in (MAX_SIZE_TRAIN × MIN_SIZE_TRAIN[0])·r, r ~ U (mmseg); (): ResizeShortestEdge.
    cfg.INPUT.RATIO_RANGE_TRAIN = ()
    # Re-draw a crop (up to 10 times) while one class covers more than this share (DeepLab's name).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # mmseg's PhotoMetricDistortion: random brightness, contrast, saturation and hue.
    cfg.INPUT.PHOTOMETRIC_DISTORTION = False

    # ------------------------------------------------ dataset validation (dge/data/validation.py)
    # Images checked before training / evaluation: "none", "headers" or "full" (decoded; cached per file set).
    cfg.DATALOADER.CHECK_IMAGES = "full"
    # A box more than 1 px outside its image: "error" stops, "clip" clips it and its polygons (counted).
    cfg.DATALOADER.BOX_OUTSIDE_IMAGE = "clip"


RENAMED = {  # keys of earlier versions: what replaced them
    "MODEL.DGE.DENSE_TRAIN": "use MODEL.DGE.ESTIMATOR official (DENSE_TRAIN True) or paper (False)",
}


def _all_keys(cfg: CN, prefix: str = "") -> list:
    keys = []
    for k, v in cfg.items():
        keys += _all_keys(v, f"{prefix}{k}.") if isinstance(v, CN) else [prefix + k]
    return keys


def _add_open_keys(cfg: CN, opts: Sequence[str]) -> None:
    """KEY VALUE pairs under a node that takes new keys (MODEL.TIMM.KWARGS): added, as a file
    adds them (yacs' ``merge_from_list`` only sets existing keys)."""
    for key, value in zip(opts[0::2], opts[1::2]):
        parent_key, _, leaf = str(key).rpartition(".")
        parent = cfg
        for part in parent_key.split(".") if parent_key else []:
            parent = parent.get(part) if isinstance(parent, CN) else None
        if isinstance(parent, CN) and parent.is_new_allowed() and leaf not in parent:
            parent[leaf] = CN._decode_cfg_value(value)


def merge_config(cfg: CN, config_file: str, opts: Sequence[str] = ()) -> CN:
    """``cfg.merge_from_file`` + ``merge_from_list``, where a misspelt key raises a KeyError
    that names it and suggests the closest existing keys."""
    try:
        cfg.merge_from_file(config_file)
        _add_open_keys(cfg, opts)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:
        match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(e))
        if not match:
            raise
        key = match.group(1)
        if key in RENAMED:
            raise KeyError(f"config key {key} (in {config_file} or the command line) is gone: {RENAMED[key]}") from None
        close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.7)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise KeyError(f"Non-existent config key: {key} (in {config_file} or the command line){hint}") from None
    return cfg


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's config + dge's keys, merged with ``config_file`` and ``opts`` (KEY VALUE
    pairs); MODEL.DEVICE falls back to "cpu" where CUDA is not available. Not frozen."""
    import torch
    from detectron2.config import get_cfg

    cfg = add_dge_config(get_cfg())
    merge_config(cfg, config_file, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    _warn_small_inputs(cfg)
    return cfg


MIN_SIDE = 64  # px: below it the stride-32 stage has fewer than 2 tokens per side


def _warn_small_inputs(cfg: CN) -> None:
    sizes = {"INPUT.MIN_SIZE_TEST": [cfg.INPUT.MIN_SIZE_TEST], "INPUT.MIN_SIZE_TRAIN": list(cfg.INPUT.MIN_SIZE_TRAIN)}
    for key, values in sizes.items():
        small = [v for v in values if 0 < v < MIN_SIDE]  # 0: no resizing (detectron2)
        if small:
            warnings.warn(
                f"{key} {small[0]} is below {MIN_SIDE} px: the stride-32 stage gets fewer than 2 tokens per side "
                "and a DGE region covers more than the image; detections at this size are not meaningful",
                stacklevel=2,
            )
