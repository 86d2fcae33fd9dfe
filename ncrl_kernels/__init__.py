"""ncrl_kernels: fused group-bilinear head + None Class Ranking Loss for document-level RE.

    import ncrl_kernels
    loss = ncrl_kernels.fused_ncrl(hs, ts, bilinear.weight, bilinear.bias, labels)

See README.md for the backends and the numerical contract, docs/spec.md.
"""
from .functional import (
    atl_loss,
    available_backends,
    bce_loss,
    fused_ncrl,
    group_bilinear,
    ncrl_loss,
    predict,
)
from .modules import GroupBilinear, GroupBilinearLoss, NCRLoss

__version__ = "0.1.0"

__all__ = [
    "atl_loss",
    "available_backends",
    "bce_loss",
    "fused_ncrl",
    "group_bilinear",
    "ncrl_loss",
    "predict",
    "GroupBilinear",
    "GroupBilinearLoss",
    "NCRLoss",
]
