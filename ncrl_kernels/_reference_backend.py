"""The "reference" backend: the unfused PyTorch reference behind the backend interface. Under
autocast it casts the head's inputs as F.linear does (autograd records the casts)."""
from . import reference

loss_fn = reference.loss_fn


def group_bilinear(hs, ts, weight, bias, block_size, symmetric, autocast):
    return reference.group_bilinear(*reference.autocast_head(hs, ts, weight, autocast), bias, block_size, symmetric)


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction, autocast):
    logits = group_bilinear(hs, ts, weight, bias, block_size, symmetric, autocast)
    return reference.loss_fn(logits, labels, loss, gamma, margin_reg, reduction), logits
