"""Input checks shared by every backend (docs/spec.md "Bad input").

They run before dispatch and look only at metadata (shape, dtype, device), so they never
synchronise a GPU stream and trace cleanly under ``torch.compile``.
"""
import numbers

import torch

from .reference import LOSSES, head_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name, x, *, ndim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {x.dtype}; "
            f"convert it with {name}.float()"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {found}; move them with .to(device)")


def check_flag(name, value):
    """A switch: True or False; numpy bools and the ints 0 and 1 pass too. A string such as "False"
    would otherwise count as true."""
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")  # numpy 2, 1
    if not isinstance(value, numbers.Integral) and not numpy_bool:
        raise TypeError(f"{name} must be True or False, got {value!r}")
    if value not in (0, 1):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_positive_int(name, value):
    # (type(...) is int first: an ABC isinstance check costs the host more than the rest of this line)
    if (type(value) is not int and (isinstance(value, bool) or not isinstance(value, numbers.Integral))) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_head(hs, ts, weight, bias, block_size, autocast_dtype=None):
    """Checks of the group-bilinear head; returns (N, E, C). Under autocast (`autocast_dtype`),
    hs, ts and weight must share the dtype they will run in (every floating dtype but fp64 is
    cast to the autocast dtype)."""
    check_tensor("hs", hs, ndim=2)
    check_tensor("ts", ts, ndim=2)
    check_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    device = hs.device
    if not (ts.device == device and weight.device == device and (bias is None or bias.device == device)):
        check_same_device(hs=hs, ts=ts, weight=weight, bias=bias)  # says which differ
    if hs.shape != ts.shape:
        raise ValueError(f"hs and ts must have the same shape [N, E], got {tuple(hs.shape)} and {tuple(ts.shape)}")
    if not (head_dtype(hs.dtype, autocast_dtype) == head_dtype(ts.dtype, autocast_dtype)
            == head_dtype(weight.dtype, autocast_dtype)):
        raise TypeError(
            f"hs, ts and weight must share one dtype, got {hs.dtype}, {ts.dtype} and {weight.dtype}; "
            "cast them with .to(dtype) or run under torch.autocast"
        )
    check_positive_int("block_size", block_size)
    n, emb = hs.shape
    if emb % block_size != 0:
        raise ValueError(f"emb size E={emb} of hs/ts must be divisible by block_size={block_size}")
    classes = weight.shape[0]
    if weight.shape[1] != emb * block_size:
        if weight.shape[0] == emb * block_size:  # [E*B, C]: transposed
            raise ValueError(
                f"weight must have shape (C, E*block_size) like nn.Linear(E*block_size, C).weight, got "
                f"{tuple(weight.shape)}, which is (E*block_size, C); pass weight.T (nn.Linear stores [out, in])"
            )
        raise ValueError(
            f"weight must have shape (C, E*block_size) = ({classes}, {emb * block_size}) like "
            f"nn.Linear(E*block_size, C).weight, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (classes,):
        raise ValueError(f"bias must have shape (C,) = ({classes},), got {tuple(bias.shape)}")
    return n, emb, classes


def check_loss_args(loss, gamma, margin_reg, reduction):
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be a number in [0, 1) (a Python float, not a tensor), got {gamma!r}")
    check_flag("margin_reg", margin_reg)


def check_labels(labels, n, classes, device, scores="logits"):
    """Multi-hot labels [N, C]: float, bool or int (converted by the caller, never in place), on
    the device of the tensor named `scores` ("logits", or "hs" for the fused op)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_complex():
        raise TypeError(f"labels must be a real multi-hot tensor (float, bool or int), got {labels.dtype}")
    if labels.shape != (n, classes):
        if labels.shape == (n, classes - 1):
            hint = " (column 0 is the none class, 'Na': 1 where a pair has no relation)"
        elif labels.dim() == 1 or labels.shape == (n, 1):
            hint = " (turn class indices into a multi-hot [N, C] tensor first)"
        elif labels.shape == (classes, n):
            hint = " (transposed? labels.T has the shape)"
        else:
            hint = ""
        raise ValueError(f"labels must have shape (N, C) = ({n}, {classes}), got {tuple(labels.shape)}{hint}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but {scores} is on {device}; move it with .to(device)")
    check_loss_classes(classes)


def check_loss_classes(classes, name="C"):
    """`name`: what the caller calls the class count (a module's num_classes; C, the labels' columns)."""
    if classes < 2:
        raise ValueError(f"need at least 2 classes (the none class in column 0 and one relation), got {name}={classes}")


def check_logits_and_labels(logits, labels):
    check_tensor("logits", logits, ndim=2)
    check_labels(labels, logits.shape[0], logits.shape[1], logits.device)
