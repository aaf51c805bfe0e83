"""Every config key dge adds to detectron2's config, with its default."""
from detectron2.config import CfgNode as CN


def add_dge_config(cfg: CN) -> CN:
    """Add the MODEL.DGE keys to ``cfg`` (in place) and return it."""
    cfg.MODEL.DGE = CN()
    # Wrap every encoder block of the backbone in a Dynamic Grained Encoder.
    cfg.MODEL.DGE.ENABLED = False
    return cfg
