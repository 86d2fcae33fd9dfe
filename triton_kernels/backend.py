"""The "triton" backend: the Triton kernels registered as PyTorch operators with autograd, behind
the backend interface of ``ncrl_kernels._dispatch``.

The operators mirror the C++ ones (csrc/ops.cpp) under their own names:

- ``ncrl_kernels::triton_fused_forward`` -> (loss, logits, d loss / d logits): head and loss in
  one kernel launch (plus the sum of the per-pair losses); its backward scales d loss / d logits
  by the incoming gradient (a scalar for "mean"/"sum", one value per pair for "none") and runs the
  head backward. Nothing but the inputs and d loss / d logits is saved.
- ``ncrl_kernels::triton_head_forward`` / ``triton_head_backward``: the head alone.
- ``ncrl_kernels::triton_loss_forward`` -> (loss, d loss / d logits): the losses alone.

On CUDA they are ``torch.library.triton_op``s whose kernels are launched through ``wrap_triton``,
so ``torch.compile`` traces into them (no graph break; Inductor sees the kernels). Under the
Triton interpreter (TRITON_INTERPRET=1, CPU tensors) ``wrap_triton`` cannot trace interpreted
kernels, so the same functions are registered as opaque ``custom_op``s with explicit fake
kernels; everything else is identical.

fp32 matmuls use TF32 exactly when ``torch.backends.cuda.matmul.allow_tf32`` is set (the flag
cuBLAS follows, set by ``torch.set_float32_matmul_precision("high")``); it is read when the op is
called and passed to the kernels.
"""
from typing import Optional

import torch
from torch import Tensor

from .._dispatch import TRITON_INTERPRET
from ._common import LOSS_CODES
from .head_backward import launch_head_backward
from .head_forward import launch_head_forward
from .loss_rows import launch_loss


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(row_loss, reduction):
    """Per-pair losses [N] -> the loss of SPEC.md ("mean" divides by N and is 0 for N == 0)."""
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total / max(row_loss.shape[0], 1) if reduction == "mean" else total


def _define(name, fn, fake):
    """Register `fn` as the operator ncrl_kernels::<name> (see the module docstring)."""
    qualname = f"ncrl_kernels::{name}"
    if TRITON_INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=())


# Operators.


def _head_forward(hs: Tensor, ts: Tensor, weight: Tensor, bias: Optional[Tensor], block_size: int,
                  symmetric: bool, allow_tf32: bool) -> Tensor:
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    logits = hs.new_empty((hs.shape[0], weight.shape[0]))
    launch_head_forward(hs, ts, weight, None if bias is None else bias.contiguous(), logits, block_size=block_size,
                        symmetric=symmetric, allow_tf32=allow_tf32)
    return logits


def _head_forward_fake(hs, ts, weight, bias, block_size, symmetric, allow_tf32):
    return hs.new_empty((hs.shape[0], weight.shape[0]))


head_forward = _define("triton_head_forward", _head_forward, _head_forward_fake)


def _head_backward(grad_logits: Tensor, hs: Tensor, ts: Tensor, weight: Tensor, block_size: int, symmetric: bool,
                   allow_tf32: bool, input_grad: bool, weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d hs, d ts, d weight, d bias); gradients not asked for are empty tensors. d bias is in the
    loss dtype (fp32, fp64 for fp64 inputs), the others in their input's dtype."""
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    dhs, dts, dweight, dbias = _empty_head_grads(grad_logits, hs, ts, weight, block_size, symmetric, allow_tf32,
                                                   input_grad, weight_grad)
    launch_head_backward(
        grad_logits.contiguous(), hs, ts, weight, block_size=block_size, symmetric=symmetric, allow_tf32=allow_tf32,
        dhs=dhs if input_grad else None, dts=dts if input_grad else None,
        dweight=dweight if weight_grad else None, dbias=dbias if weight_grad else None,
    )
    return dhs, dts, dweight, dbias


def _empty_head_grads(grad_logits, hs, ts, weight, block_size, symmetric, allow_tf32, input_grad, weight_grad):
    """The outputs of triton_head_backward, unfilled (also its fake kernel)."""
    loss_dtype = _loss_dtype(hs.dtype)
    return (
        torch.empty_like(hs, memory_format=torch.contiguous_format) if input_grad else hs.new_empty(0),
        torch.empty_like(ts, memory_format=torch.contiguous_format) if input_grad else ts.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if weight_grad else weight.new_empty(0),
        weight.new_empty(weight.shape[0] if weight_grad else 0, dtype=loss_dtype),
    )


head_backward = _define("triton_head_backward", _head_backward, _empty_head_grads)


def _loss_forward(logits: Tensor, labels: Tensor, loss: str, gamma: float, margin_reg: bool,
                  reduction: str) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d logits), computed in the loss dtype."""
    logits = logits.to(_loss_dtype(logits.dtype)).contiguous()
    row_loss, dlogits = logits.new_empty(logits.shape[0]), torch.empty_like(logits)
    launch_loss(logits, labels.contiguous(), dlogits, row_loss, loss=LOSS_CODES[loss], gamma=gamma,
                margin_reg=margin_reg, mean=reduction == "mean")
    return _reduce(row_loss, reduction), dlogits


def _loss_forward_fake(logits, labels, loss, gamma, margin_reg, reduction):
    loss_dtype = _loss_dtype(logits.dtype)
    shape = (logits.shape[0],) if reduction == "none" else ()
    return logits.new_empty(shape, dtype=loss_dtype), logits.new_empty(logits.shape, dtype=loss_dtype)


loss_forward = _define("triton_loss_forward", _loss_forward, _loss_forward_fake)


def _fused_forward(hs: Tensor, ts: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, block_size: int,
                   symmetric: bool, loss: str, gamma: float, margin_reg: bool, reduction: str,
                   allow_tf32: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, logits, d loss / d logits): one kernel launch, plus torch's sum of the per-pair losses
    for "mean"/"sum". The logits are always written: the backend interface returns them, and they
    cost one [N, C] store next to the d loss / d logits that the backward needs anyway."""
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    n, classes = hs.shape[0], weight.shape[0]
    loss_dtype = _loss_dtype(hs.dtype)
    logits = hs.new_empty((n, classes))
    dlogits = hs.new_empty((n, classes), dtype=loss_dtype)
    row_loss = hs.new_empty((n,), dtype=loss_dtype)
    launch_head_forward(
        hs, ts, weight, None if bias is None else bias.contiguous(), logits, block_size=block_size,
        symmetric=symmetric, allow_tf32=allow_tf32, labels=labels.contiguous(), dlogits=dlogits, row_loss=row_loss,
        loss=LOSS_CODES[loss], gamma=gamma, margin_reg=margin_reg, mean=reduction == "mean",
    )
    return _reduce(row_loss, reduction), logits, dlogits


def _fused_forward_fake(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction,
                        allow_tf32):
    loss_dtype = _loss_dtype(hs.dtype)
    n, classes = hs.shape[0], weight.shape[0]
    shape = (n,) if reduction == "none" else ()
    return (
        hs.new_empty(shape, dtype=loss_dtype),
        hs.new_empty((n, classes)),
        hs.new_empty((n, classes), dtype=loss_dtype),
    )


fused_forward = _define("triton_fused_forward", _fused_forward, _fused_forward_fake)


# Autograd: only the saved inputs and d loss / d logits are kept; the backward recomputes features.


def _scaled_grad(grad_loss, dloss_dlogits):
    """d loss / d logits for an incoming gradient: a scalar (mean, sum) or one per pair (none)."""
    return grad_loss.reshape(-1, 1) * dloss_dlogits


def _save_head(ctx, hs, ts, weight, bias, block_size, symmetric, allow_tf32, *extra):
    ctx.save_for_backward(hs, ts, weight, *extra)
    ctx.block_size, ctx.symmetric, ctx.allow_tf32 = block_size, symmetric, allow_tf32
    ctx.bias_dtype = None if bias is None else bias.dtype


def _head_grads(ctx, grad_logits, hs, ts, weight):
    """Gradients of (hs, ts, weight, bias), None where not needed."""
    need = ctx.needs_input_grad
    dhs, dts, dweight, dbias = head_backward(
        grad_logits, hs, ts, weight, ctx.block_size, ctx.symmetric, ctx.allow_tf32, need[0] or need[1],
        need[2] or need[3],
    )
    return (
        dhs if need[0] else None,
        dts if need[1] else None,
        dweight if need[2] else None,
        dbias.to(ctx.bias_dtype) if need[3] else None,
    )


def _head_setup(ctx, inputs, output):
    _save_head(ctx, *inputs)


def _head_forward_backward(ctx, grad_logits):
    return (*_head_grads(ctx, grad_logits, *ctx.saved_tensors), None, None, None)


head_forward.register_autograd(_head_forward_backward, setup_context=_head_setup)


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _loss_backward(ctx, grad_loss, _grad_dlogits):
    (dloss_dlogits,) = ctx.saved_tensors
    return _scaled_grad(grad_loss, dloss_dlogits), None, None, None, None, None


loss_forward.register_autograd(_loss_backward, setup_context=_loss_setup)


def _fused_setup(ctx, inputs, output):
    hs, ts, weight, bias, _labels, block_size, symmetric, *_loss_args, allow_tf32 = inputs
    _, logits, dloss_dlogits = output
    _save_head(ctx, hs, ts, weight, bias, block_size, symmetric, allow_tf32, dloss_dlogits)
    ctx.mark_non_differentiable(logits, dloss_dlogits)


def _fused_backward(ctx, grad_loss, _grad_logits, _grad_dlogits):
    hs, ts, weight, dloss_dlogits = ctx.saved_tensors
    grads = _head_grads(ctx, _scaled_grad(grad_loss, dloss_dlogits), hs, ts, weight)
    return (*grads, *([None] * 8))


fused_forward.register_autograd(_fused_backward, setup_context=_fused_setup)


# The backend interface of ncrl_kernels._dispatch (arguments validated, labels already float).


def _allow_tf32():
    return torch.backends.cuda.matmul.allow_tf32


def group_bilinear(hs, ts, weight, bias, block_size, symmetric):
    return head_forward(hs, ts, weight, bias, block_size, symmetric, _allow_tf32())


def loss_fn(logits, labels, loss, gamma, margin_reg, reduction):
    return loss_forward(logits, labels, loss, float(gamma), margin_reg, reduction)[0]


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction):
    value, logits, _ = fused_forward(hs, ts, weight, bias, labels, block_size, symmetric, loss, float(gamma),
                                     margin_reg, reduction, _allow_tf32())
    return value, logits
