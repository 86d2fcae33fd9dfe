"""The "reference" backend: the unfused PyTorch reference behind the backend interface."""
from . import reference

group_bilinear = reference.group_bilinear
loss_fn = reference.loss_fn


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction):
    logits = reference.group_bilinear(hs, ts, weight, bias, block_size, symmetric)
    return reference.loss_fn(logits, labels, loss, gamma, margin_reg, reduction), logits
