"""ncrl_kernels.metrics.ncre, the paper's None Class Ranking Error (eq. 1), on hand-worked pairs."""
import pytest
import torch

import ncrl_kernels
from ncrl_kernels.metrics import ncre

# Each row: (scores f with f[0] the none class, labels y with y[0] "no relation", NCRE worked out by hand)
HAND_WORKED = [
    # f1 = 1 > f0 positive: right; f2 = -1 < f0 but positive: 1; f3 = f0 negative: a tie, 1/2.
    ([0.0, 1.0, -1.0, 0.0], [0, 1, 1, 0], 1.5),
    # A no-relation pair: f1 below f0 (right), f2 = 3 above f0 = 2 (wrong), f3 below (right).
    ([2.0, 1.0, 3.0, -4.0], [1, 0, 0, 0], 1.0),
    # Every relation on its side of f0: no error.
    ([0.5, 5.0, -5.0, 0.4], [0, 1, 0, 0], 0.0),
    # A positive tied with f0 counts 1/2 as well, and every relation ranked wrongly counts 1.
    ([1.0, 1.0, 2.0, 3.0], [0, 1, 0, 0], 2.5),
]


def as_tensors(rows):
    return (torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows], dtype=torch.float32),
            torch.tensor([r[2] for r in rows]))


def test_ncre_hand_worked_pairs():
    scores, labels, want = as_tensors(HAND_WORKED)
    torch.testing.assert_close(ncre(scores, labels, reduction="none"), want)
    torch.testing.assert_close(ncre(scores, labels, reduction="sum"), want.sum())
    torch.testing.assert_close(ncre(scores, labels), want.mean())
    # Bool and int labels mean the same; the none-class label column takes no part.
    torch.testing.assert_close(ncre(scores, labels.bool(), reduction="none"), want)
    flipped_none = labels.clone()
    flipped_none[:, 0] = 1 - flipped_none[:, 0]
    torch.testing.assert_close(ncre(scores, flipped_none.long(), reduction="none"), want)


def test_ncre_is_zero_exactly_when_the_none_class_threshold_predicts_the_labels():
    torch.manual_seed(0)
    scores = torch.randn(200, 6)
    predicted = ncrl_kernels.predict(scores, num_labels=-1)
    assert ncre(scores, predicted, reduction="sum") == 0
    # Every relation flipped away from the prediction is one error on its pair.
    labels = predicted.clone()
    labels[:50, 1] = 1 - labels[:50, 1]
    torch.testing.assert_close(ncre(scores, labels, reduction="none"), (torch.arange(200) < 50).float())


def test_ncre_no_pairs_and_bad_arguments():
    assert ncre(torch.zeros(0, 4), torch.zeros(0, 4)).item() == 0.0
    with pytest.raises(ValueError, match="labels must have the shape"):
        ncre(torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="scores must have shape"):
        ncre(torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="reduction"):
        ncre(torch.zeros(2, 4), torch.zeros(2, 4), reduction="avg")
    with pytest.raises(TypeError, match="torch.Tensor"):
        ncre([[0.0, 1.0]], torch.zeros(1, 2))
