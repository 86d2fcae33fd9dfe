"""The public functions. Each validates its arguments (docs/spec.md "Bad input"), then hands over to
one backend from the dispatch table (``_dispatch``), with the autocast dtype the head runs in (the
backend casts: head in the autocast dtype, loss in fp32, the way ATLOP runs under autocast).
"""
import math
import numbers

import torch

from . import _dispatch, _reference_backend, _validation, reference


def _autocast_dtype(device):
    """The dtype the head runs in under torch.autocast on `device`, or None when autocast is off
    (or does not exist for the device: meta tensors, for one, where asking raises). CPU and CUDA
    always have it and are not asked: torch 2.11's Dynamo cannot trace is_autocast_available, and
    a fullgraph compile would break on it."""
    if device.type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device.type):
        return None
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _float_labels(labels, dtype):
    """Labels as floats of the loss dtype: a copy for bool/int labels, never an in-place change."""
    return reference.as_dtype(labels, reference.loss_dtype(dtype))


def _check_labels_need_no_grad(labels, impl):
    """The fused backends take labels as constants: labels that autograd would differentiate (soft
    labels computed by a model) are refused there, rather than silently given no gradient."""
    if labels.requires_grad and torch.is_grad_enabled() and impl is not _reference_backend:
        raise ValueError("labels require grad, and the fused backends give labels no gradient: pass "
                         "labels.detach() if none is wanted, or backend='reference' to differentiate them")


def _check_tensors(**tensors):
    for name, x in tensors.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def group_bilinear(hs, ts, weight, bias=None, *, block_size=64, symmetric=False, backend="auto"):
    """ATLOP's group-bilinear head ``logits = bilinear(kron(hs, ts))`` without the [N, E*B] feature.

    Args:
        hs, ts: ``[N, E]`` head / tail pair representations, fp32, bf16, fp16 or fp64 (one dtype
            with ``weight``; under ``torch.autocast`` any floating dtypes, as ``F.linear`` takes).
        weight: ``[C, E*block_size]``, i.e. ``nn.Linear(E*block_size, C).weight``.
        bias: ``[C]`` or None.
        block_size: group size B (``E % B == 0``).
        symmetric: use ``max(hs_i ts_j, hs_j ts_i)`` as the feature (the NCRL authors' DocRED model).
        backend: "auto" (the fastest available for the device and the number of classes: the
            Triton kernels take up to 128) or a name from :func:`available_backends`.

    Returns:
        logits ``[N, C]`` in the dtype of ``hs``; under ``torch.autocast``, in the autocast dtype.
    """
    _check_tensors(hs=hs, ts=ts, weight=weight, bias=bias)
    autocast = _autocast_dtype(hs.device)
    _, emb, classes = _validation.check_head(hs, ts, weight, bias, block_size, autocast)
    _validation.check_flag("symmetric", symmetric)
    impl = _dispatch.resolve(backend, hs.device, classes, emb)
    return impl.group_bilinear(hs, ts, weight, bias, int(block_size), bool(symmetric), autocast)


def _loss(logits, labels, loss, gamma, margin_reg, reduction, backend):
    _validation.check_loss_args(loss, gamma, margin_reg, reduction)
    _validation.check_logits_and_labels(logits, labels)
    impl = _dispatch.resolve(backend, logits.device)
    _check_labels_need_no_grad(labels, impl)
    # The loss runs in fp32 (fp64 stays fp64); autograd casts the gradient back to logits' dtype.
    scores = logits.to(reference.loss_dtype(logits.dtype))
    return impl.loss_fn(scores, _float_labels(labels, scores.dtype), loss, float(gamma), bool(margin_reg), reduction)


def ncrl_loss(logits, labels, *, gamma=0.0, margin_reg=True, reduction="mean", backend="auto"):
    """None Class Ranking Loss on given logits ``[N, C]`` (column 0 = none class).

    ``labels`` is multi-hot ``[N, C]`` (float, bool or int). ``reduction``: "mean" (sum over pairs
    and classes divided by N), "sum" or "none" (per pair, ``[N]``). ``gamma`` in [0, 1) is the margin
    shift, ``margin_reg`` the none-class margin regulariser (docs/spec.md).
    """
    return _loss(logits, labels, "ncrl", gamma, margin_reg, reduction, backend)


def atl_loss(logits, labels, *, reduction="mean", backend="auto"):
    """ATLOP's adaptive thresholding loss (``labels`` is not modified)."""
    return _loss(logits, labels, "atl", 0.0, False, reduction, backend)


def bce_loss(logits, labels, *, reduction="mean", backend="auto"):
    """Binary cross-entropy with logits over columns 1..K, summed per pair."""
    return _loss(logits, labels, "bce", 0.0, False, reduction, backend)


def fused_ncrl(hs, ts, weight, bias, labels, *, block_size=64, symmetric=False, loss="ncrl", gamma=0.0,
               margin_reg=True, reduction="mean", return_logits=False, backend="auto"):
    """Group-bilinear head and loss in one fused op: the drop-in for ATLOP's
    ``loss_fnt(bilinear(bl).float(), labels)``, without the ``[N, E*B]`` feature forward or
    backward; gradients flow to hs, ts, weight and bias.

    Args:
        hs, ts, weight, bias, block_size, symmetric: as :func:`group_bilinear` (the head runs in
            the autocast dtype under ``torch.autocast``).
        labels: multi-hot ``[N, C]`` (float, bool or int; never modified); column 0 is the none
            class ("Na"), 1 where a pair has no relation.
        loss: "ncrl" (None Class Ranking Loss), "atl" (ATLOP's adaptive thresholding loss) or
            "bce" (binary cross-entropy over columns 1..C-1).
        gamma: NCRL's margin shift, in [0, 1) (the NCRL authors use 0.05 on DocRED).
        margin_reg: NCRL's none-class margin regulariser. ``gamma`` and ``margin_reg`` apply to
            NCRL only.
        reduction: "mean" (the sum over pairs and classes divided by N), "sum" or "none" (one
            loss per pair, ``[N]``). With N = 0 the loss is 0 and every gradient zero.
        return_logits: also return the logits ``[N, C]`` (detached; e.g. for :func:`predict`).
        backend: as :func:`group_bilinear`.

    Returns:
        the loss (a scalar, or ``[N]`` for "none"), fp32 for fp32/bf16/fp16 inputs and fp64 for
        fp64; or ``(loss, logits)`` with ``return_logits``, the logits in the head's dtype.
    """
    _check_tensors(hs=hs, ts=ts, weight=weight, bias=bias)
    autocast = _autocast_dtype(hs.device)
    n, emb, classes = _validation.check_head(hs, ts, weight, bias, block_size, autocast)
    _validation.check_flag("symmetric", symmetric)
    _validation.check_flag("return_logits", return_logits)
    _validation.check_loss_args(loss, gamma, margin_reg, reduction)
    _validation.check_labels(labels, n, classes, hs.device, scores="hs")
    impl = _dispatch.resolve(backend, hs.device, classes, emb)
    _check_labels_need_no_grad(labels, impl)
    value, logits = impl.fused(
        hs, ts, weight, bias, _float_labels(labels, hs.dtype), int(block_size), bool(symmetric), loss, float(gamma),
        bool(margin_reg), reduction, autocast,
    )
    return (value, logits.detach()) if return_logits else value


def predict(logits, *, num_labels=-1, threshold=None):
    """ATLOP/NCRL ``get_label``: float multi-hot ``[N, C]``; class k >= 1 is predicted when
    ``f_k > f_0`` (and among the row's top ``num_labels`` scores if ``num_labels > 0``); column 0 is
    set when nothing else is.

    ``threshold``: for models that learn no none-class score (trained with ``bce_loss``), a global
    threshold that takes the place of ``f_0`` (0 is probability 0.5); column 0 of ``logits`` is then
    not read."""
    _check_tensors(logits=logits)
    _validation.check_tensor("logits", logits, ndim=2)
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column (column 0: the none class), got shape "
                         f"{tuple(logits.shape)}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral):
        raise TypeError(f"num_labels must be an int (-1 or 0 for no limit), got {num_labels!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"threshold must be None or a Python float (0 for bce_loss's probability 0.5), "
                            f"got {threshold!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
    with torch.no_grad():
        if threshold is None:
            return reference.predict(logits, int(num_labels))
        # Compared in fp32 at least: a threshold tuned on dev must not be rounded to bf16 logits' grid.
        scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
        scores = reference.with_threshold(scores, float(threshold))
        return reference.predict(scores, int(num_labels)).to(logits.dtype)


def available_backends(device="cpu"):
    """Backends usable for tensors on ``device``: "reference" and "cpp" on the CPU (plus "triton"
    under TRITON_INTERPRET=1); "reference", "cuda" and "triton" on CUDA, as installed."""
    return _dispatch.available_backends(device)
