"""The C++/CUDA extension ops (``torch.ops.ncrl_kernels.*``, schemas in csrc/ops.cpp): their fake
kernels and autograd, and the backend functions "cpp" (CPU tensors) and "cuda" (CUDA tensors) run.

Importing this module never fails: when ``ncrl_kernels._C`` was not built, ``LOAD_ERROR`` says why
and the dispatcher reports those backends as unavailable.
"""
import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)

    LOAD_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


# Devices the extension has kernels for, read once: the dispatcher consults this on every call,
# including inside torch.compile, which cannot trace the query itself.
KERNEL_DEVICES = frozenset(
    key for key in ("CPU", "CUDA")
    if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("ncrl_kernels::head_forward", key)
)


def has_kernel(dispatch_key):
    """Whether the extension registered kernels for a device ("CPU", "CUDA")."""
    return dispatch_key in KERNEL_DEVICES


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scaled_grad(grad_loss, dloss_dlogits):
    """d loss/d logits for an incoming gradient: scalar (mean, sum) or per pair [N] (none)."""
    return grad_loss.reshape(-1, 1) * dloss_dlogits


def _head_backward(ctx, grad_logits, hs, ts, weight):
    input_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
    weight_grad = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    dhs, dts, dweight, dbias = torch.ops.ncrl_kernels.head_backward(
        grad_logits, hs, ts, weight, ctx.block_size, ctx.symmetric, input_grad, weight_grad
    )
    return (
        dhs if ctx.needs_input_grad[0] else None,
        dts if ctx.needs_input_grad[1] else None,
        dweight if ctx.needs_input_grad[2] else None,
        dbias.to(ctx.bias_dtype) if ctx.needs_input_grad[3] else None,
    )


if LOAD_ERROR is None:

    @torch.library.register_fake("ncrl_kernels::head_forward")
    def _(hs, ts, weight, bias, block_size, symmetric):
        return hs.new_empty((hs.shape[0], weight.shape[0]))

    @torch.library.register_fake("ncrl_kernels::head_backward")
    def _(grad_logits, hs, ts, weight, block_size, symmetric, input_grad, weight_grad):
        loss_dtype = _loss_dtype(hs.dtype)
        return (
            torch.empty_like(hs) if input_grad else hs.new_empty(0),
            torch.empty_like(ts) if input_grad else ts.new_empty(0),
            torch.empty_like(weight) if weight_grad else weight.new_empty(0),
            weight.new_empty(weight.shape[0], dtype=loss_dtype) if weight_grad else weight.new_empty(0, dtype=loss_dtype),
        )

    @torch.library.register_fake("ncrl_kernels::loss_forward")
    def _(logits, labels, loss, gamma, margin_reg, reduction):
        loss_dtype = _loss_dtype(logits.dtype)
        shape = (logits.shape[0],) if reduction == "none" else ()
        return logits.new_empty(shape, dtype=loss_dtype), logits.new_empty(logits.shape, dtype=loss_dtype)

    @torch.library.register_fake("ncrl_kernels::fused_forward")
    def _(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction):
        loss_dtype = _loss_dtype(hs.dtype)
        n, classes = hs.shape[0], weight.shape[0]
        shape = (n,) if reduction == "none" else ()
        return (
            hs.new_empty(shape, dtype=loss_dtype),
            hs.new_empty((n, classes)),
            hs.new_empty((n, classes), dtype=loss_dtype),
        )

    def _head_setup(ctx, inputs, output):
        hs, ts, weight, bias, block_size, symmetric = inputs
        ctx.save_for_backward(hs, ts, weight)
        ctx.block_size, ctx.symmetric = block_size, symmetric
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _head_forward_backward(ctx, grad_logits):
        return (*_head_backward(ctx, grad_logits, *ctx.saved_tensors), None, None)

    torch.library.register_autograd(
        "ncrl_kernels::head_forward", _head_forward_backward, setup_context=_head_setup
    )

    def _loss_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def _loss_backward(ctx, grad_loss, _grad_dlogits):
        (dloss_dlogits,) = ctx.saved_tensors
        return _scaled_grad(grad_loss, dloss_dlogits), None, None, None, None, None

    torch.library.register_autograd("ncrl_kernels::loss_forward", _loss_backward, setup_context=_loss_setup)

    def _fused_setup(ctx, inputs, output):
        hs, ts, weight, bias, labels, block_size, symmetric = inputs[:7]
        _, logits, dloss_dlogits = output
        ctx.save_for_backward(hs, ts, weight, dloss_dlogits)
        ctx.mark_non_differentiable(logits, dloss_dlogits)
        ctx.block_size, ctx.symmetric = block_size, symmetric
        ctx.bias_dtype = None if bias is None else bias.dtype

    def _fused_backward(ctx, grad_loss, _grad_logits, _grad_dlogits):
        hs, ts, weight, dloss_dlogits = ctx.saved_tensors
        grads = _head_backward(ctx, _scaled_grad(grad_loss, dloss_dlogits), hs, ts, weight)
        return (*grads, None, None, None, None, None, None, None)

    torch.library.register_autograd("ncrl_kernels::fused_forward", _fused_backward, setup_context=_fused_setup)


# Backend functions (arguments already validated, labels already float).


def group_bilinear(hs, ts, weight, bias, block_size, symmetric):
    return torch.ops.ncrl_kernels.head_forward(hs, ts, weight, bias, block_size, symmetric)


def loss_fn(logits, labels, loss, gamma, margin_reg, reduction):
    return torch.ops.ncrl_kernels.loss_forward(logits, labels, loss, float(gamma), margin_reg, reduction)[0]


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction):
    value, logits, _ = torch.ops.ncrl_kernels.fused_forward(
        hs, ts, weight, bias, labels, block_size, symmetric, loss, float(gamma), margin_reg, reduction
    )
    return value, logits
