"""The "triton" backend: the Triton kernels registered as PyTorch operators with autograd, behind
the backend interface of ``ncrl_kernels._dispatch``.

The operators mirror the C++ ones (csrc/ops.cpp) under their own names:

- ``ncrl_kernels::triton_fused_forward`` -> (loss, logits, d loss / d logits): the head's kernel
  and one epilogue kernel for bias and loss (plus the sum of the per-pair losses), which writes
  d loss / d logits as the head backward's grad operand (zero-padded, in the head's dtype where
  that loses nothing: ``grad_operand_dtype``); its backward runs the head backward on it, scaled
  by the incoming gradient (by the kernels where they can: ``_head_grads``). Autograd and the
  other fake kernels are shared with the extension's ops (ncrl_kernels/_op_autograd.py). The head
  ops take a trailing ``precision``, tl.dot's fp32 precision.
- ``ncrl_kernels::triton_head_forward`` / ``triton_head_backward``: the head alone.
- ``ncrl_kernels::triton_loss_forward`` -> (loss, d loss / d logits): the losses alone.

On CUDA they are ``torch.library.triton_op``s whose kernels are launched through ``wrap_triton``,
so ``torch.compile`` traces into them (no graph break; Inductor sees the kernels). Under the
Triton interpreter (TRITON_INTERPRET=1, CPU tensors) ``wrap_triton`` cannot trace interpreted
kernels, so the same functions are registered as opaque ``custom_op``s with explicit fake
kernels; everything else is identical. Eager calls run the same functions as
``torch.autograd.Function``s instead (``_FAMILY``; see ``_op_autograd.OpFamily``): the operators'
Python autograd layer cost the host nearly as much as the rest of a step. Like the operators'
eager kernels, they launch straight through Triton, not through wrap_triton's tracing path.

fp32 matmuls run as TF32 where PyTorch allows TF32 for matmuls, else as 3xTF32
(``_common.fp32_matmul_precision``); the setting is read when the op is called and passed to the
kernels ("ieee", which tl.dot ignores, for other dtypes). Kernels launch on the device of their
tensors.
"""
import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import _op_autograd
from .._dispatch import TRITON_INTERPRET
from ..reference import head_dtype, loss_dtype, reduce_pairs
from . import head_backward as backward_kernels, head_forward as forward_kernels, loss_rows as loss_kernels
from ._common import LOSS_CODES, precision_for
from ._launch import direct_launches
from .head_backward import (empty_grad_operand, input_grad_operand, launch_input_grad, launch_weight_grad,
                            padded_grad, weight_grad_operands)
from .head_forward import launch_head_forward
from .loss_rows import launch_epilogue, per_pair_reduction

# Every module whose kernels launch through its module-level ``launcher`` name: intercepting
# launches means patching it in each (tests/test_triton.py, bench/host_path.py).
LAUNCHING_MODULES = (forward_kernels, backward_kernels, loss_kernels)

# The kernels the operators launch (with the jit functions they call).
KERNELS = (forward_kernels.head_forward_kernel, loss_kernels.epilogue_kernel, backward_kernels.weight_grad_kernel,
           backward_kernels.input_grad_kernel)


def _on_device(tensor):
    """Triton launches on the current CUDA device: make it the tensors' one (as CUDAGuard does
    for the C++ kernels), e.g. under DDP without torch.cuda.set_device. Where it is already, no
    torch.cuda.device (its Python costs a few microseconds of the host's step, twice before the
    weight grad's launch)."""
    if not tensor.is_cuda or tensor.get_device() == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _define(name, fn, fake=None):
    """Register `fn` as the operator ncrl_kernels::triton_<name> (see the module docstring); its
    fake kernel is `fake`, by default the extension ops' one (the same outputs, see
    ncrl_kernels/_op_autograd.py)."""
    qualname = f"ncrl_kernels::triton_{name}"
    if TRITON_INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake or _op_autograd.FAKES[name])
    else:
        op = torch.library.triton_op(qualname, fn, mutates_args=())
        _declare_kernels(qualname)
    _OPS[name], _IMPLS[name] = op, _launching_directly(fn)
    return op


def _declare_kernels(qualname):
    """Make every kernel part of what torch's cache of compiled graphs (AOTAutograd's) keys the
    operator `qualname` on: it hashes the source of the kernels ``triton_op`` found in the
    operator's code, and ``triton_op`` looks for ``wrap_triton(kernel)`` calls there, which
    ``launcher`` hides, so it finds none. A compiled step cached before a kernel changed (an
    upgrade, an edit) would otherwise be reused with the old kernel. Every operator gets every
    kernel: a key that covers more than the operator launches costs only its hashing. The table
    is private (torch 2.11 to 2.14 have it)."""
    from torch._library import triton as library_triton

    if hasattr(library_triton, "triton_ops_to_kernels"):
        library_triton.triton_ops_to_kernels[qualname] = list(KERNELS)


def _launching_directly(fn):
    """`fn` for the eager route (``_op_autograd.OpFamily``), which calls it outside the operator:
    its launches go straight to Triton (``direct_launches``), as they do inside the operator's own
    eager kernel, not through wrap_triton's tracing path (four launches a step at ~0.2 ms each on
    the H200 machine's host, more than the step's GPU time)."""

    @functools.wraps(fn)
    def launch_directly(*args, **kwargs):
        with direct_launches():
            return fn(*args, **kwargs)

    return launch_directly


# name -> the operator, its implementation (filled by _define).
_OPS, _IMPLS = {}, {}


# Operators.


def _head_forward(hs: Tensor, ts: Tensor, weight: Tensor, bias: Optional[Tensor], block_size: int,
                  symmetric: bool, precision: str) -> Tensor:
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    logits = hs.new_empty((hs.shape[0], weight.shape[0]), dtype=weight.dtype)
    with _on_device(hs):
        partial = launch_head_forward(hs, ts, weight, block_size=block_size, symmetric=symmetric, precision=precision)
        launch_epilogue(partial, None if bias is None else bias.contiguous(), logits)
    return logits


head_forward = _define("head_forward", _head_forward)


def _head_backward(grad_logits: Tensor, hs: Tensor, ts: Tensor, weight: Tensor, block_size: int, symmetric: bool,
                   input_grad: bool, weight_grad: bool, precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d hs, d ts, d weight, d bias); gradients not asked for are empty tensors. d bias is in the
    loss dtype (fp32, fp64 for fp64 inputs), the others in their input's dtype."""
    return _head_grads(grad_logits, hs, ts, weight, block_size, symmetric, input_grad, weight_grad, precision)


def _head_grads(grad_logits, hs, ts, weight, block_size, symmetric, input_grad, weight_grad, precision,
                weight_grad_dtype=None, grad_scale=None):
    """The operator's head backward, what the eager route runs (_op_autograd.OpFamily), with two
    more arguments:

    - `weight_grad_dtype`: d weight's dtype (None: the weight's). The kernel writes it from its
      fp32 accumulator, so under autocast the fp32 weight, which the eager route casts itself,
      gets its fp32 gradient without a cast kernel, and without eager autocast's rounding to 16
      bits on the way.
    - `grad_scale`: the incoming gradient of a fused op's loss, by which its d loss / d logits
      (`grad_logits`, the backward's grad operand as the fused forward writes it) is to be
      scaled; None where grad_logits is the gradient itself. A scalar one, where grad_logits is
      in the operands' dtype, is applied by the kernels to their fp32 results (no kernel on the
      host's path; the same bits as scaling first where it is a power of two, as the plain
      backward's 1 and GradScaler's scales with its default factors are); one per pair ("none"),
      or grad_logits kept wider (fp16: ``head_backward.grad_operand_dtype``), scales it here, before its rounding.
    """
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    if grad_scale is not None and (grad_scale.dim() or grad_logits.dtype != weight.dtype):
        grad_logits, grad_scale = _op_autograd.scaled_grad(grad_scale, grad_logits), None
    dweight, dbias = _op_autograd.empty_weight_grads(weight, weight_grad, weight_grad_dtype)
    config = dict(block_size=block_size, symmetric=symmetric, precision=precision, scale=grad_scale)
    # Each kernel's operands are built just before its launch and dropped after it, so the fp32
    # weight grad's transposed copies of grad, hs and ts and the input grad's of the weight are
    # never held together (head_backward.py). d bias is summed in the loss dtype by the weight
    # grad's last program, from the padded grad as it was before padded_grad rounded it to the
    # operands' dtype (fp16's and "none"'s, scaled here in fp32): summed from fp16 values, its
    # small terms would be lost. bf16's mean and sum sum the bf16 operand the epilogue wrote (as
    # eager autocast's linear sums its bf16 gradient), the head op its own grad_logits.
    grad = padded_grad(grad_logits, weight.dtype)
    bias_grad = grad_logits if grad_logits.shape == grad.shape and grad_logits.is_contiguous() else grad
    with _on_device(hs):
        if weight_grad:
            launch_weight_grad(weight_grad_operands(grad, hs, ts), dweight, bias_grad, dbias, n=hs.shape[0], **config)
        # Allocated after the weight grad's launch: a host-bound step waits for the host up to
        # that launch, and the GPU then runs the weight grad for longer than the rest takes here;
        # in fp32 they are not held beside the weight grad's K-major copies either.
        dhs, dts = _op_autograd.empty_input_grads(hs, ts, input_grad)
        if input_grad:
            launch_input_grad(grad, input_grad_operand(weight), hs, ts, dhs, dts, classes=weight.shape[0], **config)
    return dhs, dts, dweight, dbias


head_backward = _define("head_backward", _head_backward)
_IMPLS["head_backward"] = _launching_directly(_head_grads)


def _loss_forward(logits: Tensor, labels: Tensor, loss: str, gamma: float, margin_reg: bool,
                  reduction: str) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d logits), computed in the loss dtype."""
    logits = logits.to(loss_dtype(logits.dtype)).contiguous()
    row_loss, dlogits = logits.new_empty(logits.shape[0]), torch.empty_like(logits)
    with _on_device(logits):
        launch_epilogue(logits[None], None, None, labels=labels.contiguous(), dlogits=dlogits, row_loss=row_loss,
                        loss=LOSS_CODES[loss], gamma=gamma, margin_reg=margin_reg, mean=reduction == "mean")
    return reduce_pairs(row_loss, per_pair_reduction(reduction)), dlogits


loss_forward = _define("loss_forward", _loss_forward)


def _fused_forward(hs: Tensor, ts: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, block_size: int,
                   symmetric: bool, loss: str, gamma: float, margin_reg: bool, reduction: str,
                   precision: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, logits, d loss / d logits as the backward's grad operand, ``grad_operand_dtype``):
    the head's kernel, then one epilogue kernel that sums its partials and runs the loss, plus
    torch's sum of the per-pair losses for "mean"/"sum". The logits are always written: the
    backend interface returns them, and they cost one [N, C] store next to the d loss / d logits
    that the backward needs anyway."""
    hs, ts, weight = hs.contiguous(), ts.contiguous(), weight.contiguous()
    n, classes = hs.shape[0], weight.shape[0]
    logits = hs.new_empty((n, classes), dtype=weight.dtype)
    dlogits = empty_grad_operand(hs, classes, weight.dtype, reduction)
    row_loss = hs.new_empty((n,), dtype=loss_dtype(weight.dtype))
    with _on_device(hs):
        partial = launch_head_forward(hs, ts, weight, block_size=block_size, symmetric=symmetric, precision=precision)
        launch_epilogue(partial, None if bias is None else bias.contiguous(), logits, labels=labels.contiguous(),
                        dlogits=dlogits, row_loss=row_loss, loss=LOSS_CODES[loss], gamma=gamma,
                        margin_reg=margin_reg, mean=reduction == "mean")
    return reduce_pairs(row_loss, per_pair_reduction(reduction)), logits, dlogits


def _fake_fused_forward(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction,
                        precision):
    """The fake kernel of _fused_forward (on the interpreter's opaque operator)."""
    value, logits, _ = _op_autograd.fake_fused_forward(hs, ts, weight, bias, labels, block_size, symmetric, loss,
                                                       gamma, margin_reg, reduction)
    return value, logits, empty_grad_operand(hs, weight.shape[0], weight.dtype, reduction)


fused_forward = _define("fused_forward", _fused_forward, _fake_fused_forward)

_FAMILY = _op_autograd.OpFamily(_OPS, _IMPLS, rounds_inputs=True)  # head_forward.rounded
_op_autograd.register_autograd(
    lambda name, backward, setup: _OPS[name].register_autograd(backward, setup_context=setup),
    _FAMILY.head_backward,
)


# The backend interface of ncrl_kernels._dispatch (arguments validated, labels already float).


def _head_dtype(hs, autocast):
    """The dtype the head runs in (autocast's, where it casts hs), checked: Triton's interpreter
    has no bf16: its tl.dot on bf16 operands returns wrong numbers (logits of 1e11), silently, so
    the head refuses bf16 there. The losses alone run on fp32 logits and take bf16."""
    dtype = head_dtype(hs.dtype, autocast)
    if TRITON_INTERPRET and dtype == torch.bfloat16:
        raise ValueError(
            "backend='triton' on the CPU runs Triton's interpreter, which has no bf16 (the head's results would be "
            "wrong): pass fp32 or fp16 tensors (outside bf16 autocast), or use backend='cpp' or 'reference' for bf16"
        )
    return dtype


def group_bilinear(hs, ts, weight, bias, block_size, symmetric, autocast):
    return _FAMILY("head_forward", hs, ts, weight, bias, block_size, symmetric,
                   precision_for(_head_dtype(hs, autocast)), autocast=autocast)


def loss_fn(logits, labels, loss, gamma, margin_reg, reduction):
    return _FAMILY("loss_forward", logits, labels, loss, float(gamma), margin_reg, reduction)[0]


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction, autocast):
    value, logits, _ = _FAMILY("fused_forward", hs, ts, weight, bias, labels, block_size, symmetric, loss,
                               float(gamma), margin_reg, reduction, precision_for(_head_dtype(hs, autocast)),
                               autocast=autocast)
    return value, logits
