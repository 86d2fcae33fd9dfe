"""NCRE, the None Class Ranking Error: the multi-label measure the NCRL loss is a Bayes-consistent
surrogate of (paper eq. 1).

For one entity pair with class scores ``f`` (``f[0]`` the none class) and labels ``y`` over the K
relation classes ``1..K``::

    NCRE(y, f) = sum_{i=1..K} [y_i > 0][f_i < f_0] + [y_i <= 0][f_i > f_0] + 1/2 [f_i = f_0]

i.e. the number of relation classes ranked on the wrong side of the none-class score, a tie counting
one half. The none-class label ``y_0`` takes no part: the sum runs over the relations only. Zero
means every positive relation scores above ``f_0`` and every negative one below it, which is exactly
when the prediction rule ``f_k > f_0`` (without a top-k limit) returns the gold labels.
"""
import torch

from ._validation import REDUCTIONS
from .reference import reduce_pairs

__all__ = ["ncre"]


def ncre(scores, labels, reduction="mean"):
    """None Class Ranking Error of class scores ``[N, C]`` (column 0 the none-class score ``f_0``)
    against multi-hot labels ``[N, C]`` (column 0, "no relation", is ignored).

    Args:
        scores: per pair the scores the prediction compares, e.g. the model's logits (for a model
            trained with BCE, column 0 replaced by its global threshold: see
            :meth:`ncrl_kernels.atlop.DocREModel.pair_scores`).
        labels: multi-hot labels of the same shape (float, int or bool); a relation is positive
            where its label is > 0.
        reduction: "mean" (average over pairs; 0.0 for no pairs), "sum" or "none" (``[N]``).

    Returns:
        A float tensor: errors counted per pair, so between 0 and K = C - 1.
    """
    if not isinstance(scores, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"scores and labels must be torch.Tensors, got {type(scores).__name__} and "
                        f"{type(labels).__name__}")
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must have shape [pairs, classes] with classes >= 2 (column 0 the none class), "
                         f"got {list(scores.shape)}")
    if labels.shape != scores.shape:
        raise ValueError(f"labels must have the shape of scores {list(scores.shape)}, got {list(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    relation_scores, none_score = scores[:, 1:], scores[:, :1]
    positive = labels[:, 1:] > 0
    wrong_side = torch.where(positive, relation_scores < none_score, relation_scores > none_score)
    per_pair = wrong_side.float().sum(1) + 0.5 * (relation_scores == none_score).float().sum(1)
    return reduce_pairs(per_pair, reduction)
