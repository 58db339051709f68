"""``losses.check_target``: a loss's own checks of its output and target without computing the loss
(``loss_hessians.target_scale`` uses it), raising what the loss raises."""

import numpy as np
import pytest

from jacgrad.nn import loss_workspace as _loss_workspace, loss_hessians, losses

CASES = [
    ("mse", np.zeros((3, 2)), np.zeros((3, 3))),
    ("sigmoid_bce", np.zeros((3, 2)), np.zeros((2, 2))),
    ("softmax_cross_entropy", np.zeros((3, 4)), np.array([0, 4, 1])),
    ("softmax_cross_entropy", np.zeros((3, 4)), np.array([0, 1])),
    ("softmax_cross_entropy", np.zeros((3, 4)), np.zeros(3)),
    ("softmax_cross_entropy", np.zeros((3, 4)), np.zeros((3, 5))),
    ("softmax_cross_entropy", np.zeros(4), np.array([0])),
    ("mse", np.zeros((3, 2)), np.zeros((3, 2), dtype=np.int64)),
]


@pytest.mark.parametrize("name,y,t", CASES)
def test_the_same_error_as_the_loss(name, y, t):
    with pytest.raises((ValueError, TypeError)) as from_loss:
        losses.get(name)(y, t)
    with pytest.raises(type(from_loss.value), match=None) as from_check:
        losses.check_target(name, y, t)
    assert str(from_check.value) == str(from_loss.value)


def test_a_valid_target_passes_without_computing_the_loss(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loss was computed")

    monkeypatch.setattr(_loss_workspace.LossWorkspace, "__call__", refuse)
    rng = np.random.default_rng(0)
    y = rng.standard_normal((4, 3))
    for name, t in [("mse", rng.standard_normal((4, 3))), ("sigmoid_bce", rng.random((4, 3))),
                    ("softmax_cross_entropy", np.array([0, 2, 1, 2])),
                    ("softmax_cross_entropy", rng.dirichlet(np.ones(3), 4))]:
        losses.check_target(name, y, t)
        loss_hessians.target_scale(name, y, t)
    with pytest.raises(ValueError, match="mse"):
        losses.check_target("hinge", y, y)
