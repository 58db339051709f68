"""loss_hessians names a bad loss as jacgrad.nn.losses.get does (one check, one message)."""

import numpy as np
import pytest

from jacgrad.nn import loss_hessians

MESSAGE = "unknown loss {}; valid names: mse, sigmoid_bce, softmax_cross_entropy;"


@pytest.mark.parametrize("name", ["hinge", ["mse"]])  # a list is unhashable: still the ValueError, not a TypeError
def test_unknown_loss_is_a_valueerror_listing_the_valid_names(name):
    y = np.zeros((2, 3))
    for call in (lambda: loss_hessians.hessian_vp(name, y, y), lambda: loss_hessians.hessian_factor(name, y)):
        with pytest.raises(ValueError) as info:
            call()
        assert info.value.args[0].startswith(MESSAGE.format(repr(name)))
