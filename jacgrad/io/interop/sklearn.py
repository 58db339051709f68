"""scikit-learn: a fitted ``MLPClassifier`` / ``MLPRegressor`` as a ``NetSpec``, and sklearn's
loss conventions written out once.

The network: ``W_j = coefs_[j]`` (already ``(H_{j-1}, H_j)``, jacgrad's layout), ``b_j =
intercepts_[j]``; every hidden layer has the estimator's ``activation`` (``identity``,
``logistic`` -> ``sigmoid``, ``tanh``, ``relu``), and the output layer is read from the estimator's
``out_activation_`` (``OUTPUT_ACTIVATIONS``), one row per value sklearn sets:

- ``identity`` (``MLPRegressor(loss="squared_error")``): ``identity``; ``net(x)`` is ``predict``;
- ``softmax`` (multiclass ``MLPClassifier``): ``identity`` — the logits; the softmax belongs to
  the loss, as in jacgrad's ``softmax_cross_entropy``: ``softmax(net(x))`` is ``predict_proba``;
- ``logistic`` (binary or multilabel ``MLPClassifier``): ``identity`` — the logits; the sigmoid
  belongs to ``sigmoid_bce``: ``sigmoid(net(x))`` is the positive-class probability;
- ``exp`` (``MLPRegressor(loss="poisson")``): jacgrad's activation table has no ``exp``, so the
  import is a ``ValueError`` (importing ``identity`` would give ``log(predict)``); any other
  value is refused the same way.

sklearn's losses against jacgrad's (``n`` samples, ``k`` outputs, ``Y`` the label-binarised
targets ``estimator._label_binarizer.transform(y)`` for a classifier):

=================  =====================================  ======================================
estimator          sklearn's loss (``_backprop``)         in jacgrad's terms
=================  =====================================  ======================================
MLPRegressor       squared error ``½·mean((y - p)²)``     ``mse / 2``; but its gradient
                   over all ``n·k`` elements              ``(p - y)/n`` is ``k/2 ×`` the gradient
                                                          of jacgrad's ``mse``
multiclass         ``-Σ Y log softmax(z) / n``            ``softmax_cross_entropy``, same
                                                          gradient
binary/multilabel  ``-Σ_{i,c} [Y log σ + (1-Y) log(1-σ)]  ``k × sigmoid_bce`` (it sums over the
                   / n`` (sums over the k outputs)        outputs; jacgrad means), gradient too
every estimator    ``+ alpha/2 · Σ_j ‖W_j‖² / n``         not in jacgrad's losses: add
                   (weights only, not the biases)         ``alpha · W_j / n`` to ∂W_j
=================  =====================================  ======================================

sklearn's ``deltas`` are for the loss summed over samples (``p - Y`` at the output), its
``coef_grads`` divide by ``n`` after the product. ``sklearn_loss_and_grads`` applies exactly
this table to jacgrad's ``loss_and_grads`` and returns what ``_backprop`` returns; the tests
compare the two. (sklearn also clips probabilities to ``[eps, 1 - eps]`` inside its log loss,
which changes the value only for predictions within ``eps`` of 0 or 1.)
"""

from __future__ import annotations

import numpy as np

from ...elementwise import activations as _activations
from ...core.backend import get_xp
from . import NetSpec, Origin, require

__all__ = ["ACTIVATIONS", "OUTPUT_ACTIVATIONS", "spec_from_sklearn", "sklearn_loss_and_grads"]

ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh", "relu": "relu"}
# sklearn's out_activation_ -> jacgrad's output activation; None: no jacgrad counterpart (refused)
OUTPUT_ACTIVATIONS = {"identity": "identity", "softmax": "identity", "logistic": "identity", "exp": None}


def _check(estimator):
    require("sklearn", "reading a scikit-learn estimator", "pip install scikit-learn")
    from sklearn.exceptions import NotFittedError
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(estimator, (MLPClassifier, MLPRegressor)):
        raise TypeError(f"from_sklearn takes an MLPClassifier or MLPRegressor, not {type(estimator).__name__}")
    try:
        check_is_fitted(estimator, ("coefs_", "intercepts_"))
    except NotFittedError:
        raise ValueError(f"this {type(estimator).__name__} is not fitted: call fit(X, y) first") from None
    if estimator.activation not in ACTIVATIONS:
        raise ValueError(f"{type(estimator).__name__}: activation {estimator.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return MLPClassifier


def spec_from_sklearn(estimator, copy: bool = True) -> NetSpec:
    """A ``NetSpec`` of a fitted estimator (``copy=False`` shares its ``coefs_``/``intercepts_``)."""
    _check(estimator)
    out = getattr(estimator, "out_activation_", None)
    output = OUTPUT_ACTIVATIONS.get(out)
    if output is None:
        loss = f"loss={estimator.loss!r}, " if hasattr(estimator, "loss") else ""
        raise ValueError(f"{type(estimator).__name__}({loss}...) has output activation out_activation_={out!r}, which "
                         f"jacgrad's activations cannot compute (they are {', '.join(_activations.names())}); importing "
                         f"it as identity would make net(x) the log of predict(x), so it is not imported. Importable "
                         f"outputs: {', '.join(k for k, v in OUTPUT_ACTIVATIONS.items() if v)}")
    take = (lambda a: np.array(a, copy=True)) if copy else np.asarray
    weights = [take(W) for W in estimator.coefs_]
    biases = [take(b) for b in estimator.intercepts_]
    acts = [ACTIVATIONS[estimator.activation]] * (len(weights) - 1) + [output]
    return NetSpec(weights, biases, acts, source=type(estimator).__name__, origin=Origin("sklearn"))



def sklearn_loss_and_grads(net, estimator, X, y):
    """``(loss, coef_grads, intercept_grads)`` as sklearn's ``estimator._backprop`` computes them
    for ``net`` (the network of ``estimator``) on ``X (n, n_in)`` and targets ``y`` — jacgrad's
    ``loss_and_grads`` scaled by the table in this module's docstring, L2 term included."""
    MLPClassifier = _check(estimator)
    xp = get_xp(net.weights[0])
    n = X.shape[0]
    if isinstance(estimator, MLPClassifier):
        Y = np.asarray(estimator._label_binarizer.transform(y), dtype=net.dtype)
        if estimator.out_activation_ == "softmax":
            loss, g = net.loss_and_grads(X, xp.asarray(Y), loss="softmax_cross_entropy")
            scale = 1.0
        else:  # logistic: binary or multilabel, summed over the k outputs
            loss, g = net.loss_and_grads(X, xp.asarray(Y), loss="sigmoid_bce")
            scale = float(Y.shape[1])
            loss = loss * scale
    else:
        if estimator.loss != "squared_error":
            raise ValueError(f"MLPRegressor(loss={estimator.loss!r}): only squared_error has a jacgrad counterpart")
        Y = np.asarray(y, dtype=net.dtype).reshape(n, -1)
        loss, g = net.loss_and_grads(X, xp.asarray(Y), loss="mse")
        scale = Y.shape[1] / 2.0
        loss = loss / 2.0
    alpha = float(estimator.alpha)
    loss = float(loss) + 0.5 * alpha * sum(float((W * W).sum()) for W in net.weights) / n
    coef_grads = [scale * dW + alpha * W / n for dW, W in zip(g.weights, net.weights)]
    intercept_grads = [scale * db for db in g.biases]
    return loss, coef_grads, intercept_grads
