"""nn.Module wrappers of the functional API."""
import math

import torch
from torch import nn

from . import _dispatch, _validation
from . import functional as F_ncrl


class NCRLoss(nn.Module):
    """None Class Ranking Loss on logits: ``NCRLoss(gamma=0.05)(logits, labels)``."""

    def __init__(self, gamma=0.0, margin_reg=True, reduction="mean", backend="auto"):
        super().__init__()
        # Settings are checked here, not at the first forward (the tensors are checked per call).
        _validation.check_loss_args("ncrl", gamma, margin_reg, reduction)
        _dispatch.check_backend_name(backend)
        self.gamma, self.margin_reg, self.reduction, self.backend = gamma, margin_reg, reduction, backend

    def forward(self, logits, labels):
        return F_ncrl.ncrl_loss(
            logits, labels, gamma=self.gamma, margin_reg=self.margin_reg, reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self):
        return (f"gamma={self.gamma}, margin_reg={self.margin_reg}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class GroupBilinear(nn.Module):
    """ATLOP's group-bilinear classifier. Owns ``weight [C, E*B]`` and ``bias [C]`` exactly like
    ``nn.Linear(E*B, C)`` (same names, shapes and initialisation), so ATLOP's ``bilinear`` state
    dict loads into it; ``forward(hs, ts)`` returns the logits without building the feature."""

    def __init__(self, emb_size, block_size, num_classes, bias=True, *, symmetric=False, backend="auto",
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("emb_size", emb_size), ("block_size", block_size), ("num_classes", num_classes)):
            _validation.check_positive_int(name, value)
        if emb_size % block_size != 0:
            raise ValueError(f"emb_size={emb_size} must be divisible by block_size={block_size}")
        _validation.check_flag("symmetric", symmetric)
        _dispatch.check_backend_name(backend)
        # A class count the backend refuses whatever the device (Triton past 128) is refused here.
        reason = _dispatch.head_reason(backend, num_classes, torch.device(device or "cuda"))
        if reason is not None:
            raise ValueError(f"backend={backend!r} cannot run a head of num_classes={num_classes}: {reason}")
        self.emb_size, self.block_size, self.num_classes = emb_size, block_size, num_classes
        self.symmetric, self.backend = symmetric, backend
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_classes, emb_size * block_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_classes, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight.shape[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, hs, ts):
        return F_ncrl.group_bilinear(
            hs, ts, self.weight, self.bias, block_size=self.block_size, symmetric=self.symmetric,
            backend=self.backend,
        )

    def extra_repr(self):
        return (f"emb_size={self.emb_size}, block_size={self.block_size}, num_classes={self.num_classes}, "
                f"bias={self.bias is not None}, symmetric={self.symmetric}, backend={self.backend!r}")


class GroupBilinearLoss(GroupBilinear):
    """Group-bilinear head + loss, fused: ``forward(hs, ts, labels)`` returns the loss (and the
    detached logits with ``return_logits=True``); without labels it returns the logits (inference)."""

    def __init__(self, emb_size, block_size, num_classes, bias=True, *, symmetric=False, loss="ncrl",
                 gamma=0.0, margin_reg=True, reduction="mean", backend="auto", device=None, dtype=None):
        super().__init__(emb_size, block_size, num_classes, bias, symmetric=symmetric, backend=backend,
                         device=device, dtype=dtype)
        _validation.check_loss_args(loss, gamma, margin_reg, reduction)
        _validation.check_loss_classes(num_classes, "num_classes")
        self.loss, self.gamma, self.margin_reg, self.reduction = loss, gamma, margin_reg, reduction

    def forward(self, hs, ts, labels=None, return_logits=False):
        if labels is None:
            return super().forward(hs, ts)
        return F_ncrl.fused_ncrl(
            hs, ts, self.weight, self.bias, labels, block_size=self.block_size, symmetric=self.symmetric,
            loss=self.loss, gamma=self.gamma, margin_reg=self.margin_reg, reduction=self.reduction,
            return_logits=return_logits, backend=self.backend,
        )

    def extra_repr(self):
        return (f"{super().extra_repr()}, loss={self.loss!r}, gamma={self.gamma}, margin_reg={self.margin_reg}, "
                f"reduction={self.reduction!r}")
