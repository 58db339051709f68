"""MLP.from_sklearn against scikit-learn itself, on the load_digits data that ships with it:
predict_proba / predict from the imported network, and sklearn's own ``_backprop`` (loss,
coef_grads, intercept_grads) against ``interop.sklearn.sklearn_loss_and_grads`` — multiclass,
binary, multilabel and regression, for every hidden activation sklearn has."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import jacgrad as jg

sklearn = pytest.importorskip("sklearn")
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402

from jacgrad.io.interop.sklearn import sklearn_loss_and_grads  # noqa: E402

TOL = 1e-12


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:300] / 16.0, y[:300]


def targets(kind, y, X):
    return {
        "multiclass": y,
        "binary": (y >= 5).astype(int),
        "multilabel": np.stack([y >= 5, y % 2 == 0, y < 3], axis=1).astype(int),
        "regression": y.astype(float),
        "regression-2": np.stack([y.astype(float), X[:, 20] * 3.0], axis=1),
    }[kind]


def fit(kind, activation, X, y):
    Est = MLPRegressor if kind.startswith("regression") else MLPClassifier
    est = Est(hidden_layer_sizes=(16, 12), activation=activation, alpha=3e-3, max_iter=25, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return est.fit(X, y)


def sklearn_backprop(est, X, Y):
    """sklearn's own loss and gradients at the fitted parameters."""
    n = X.shape[0]
    units = [X.shape[1], *[W.shape[1] for W in est.coefs_]]
    acts = [X] + [np.empty((n, u)) for u in units[1:]]
    deltas = [np.empty_like(a) for a in acts[1:]]
    cg = [np.empty_like(W) for W in est.coefs_]
    ig = [np.empty_like(b) for b in est.intercepts_]
    return est._backprop(X, Y, None, acts, deltas, cg, ig)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


KINDS = ["multiclass", "binary", "multilabel", "regression", "regression-2"]


@pytest.mark.parametrize("activation", ["identity", "logistic", "tanh", "relu"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_sklearn_predictions_and_backprop(kind, activation, digits):
    X, y = digits
    t = targets(kind, y, X)
    est = fit(kind, activation, X, t)
    net = jg.MLP.from_sklearn(est)
    hidden = {"logistic": "sigmoid"}.get(activation, activation)
    assert net.activations == [hidden, hidden, "identity"]
    z = net(X)
    if kind == "multiclass":
        np.testing.assert_allclose(softmax(z), est.predict_proba(X), rtol=TOL, atol=TOL)
    elif kind == "binary":
        np.testing.assert_allclose(sigmoid(z[:, 0]), est.predict_proba(X)[:, 1], rtol=TOL, atol=TOL)
    elif kind == "multilabel":
        np.testing.assert_allclose(sigmoid(z), est.predict_proba(X), rtol=TOL, atol=TOL)
    else:
        np.testing.assert_allclose(z.reshape(est.predict(X).shape), est.predict(X), rtol=TOL, atol=TOL)

    Y = est._label_binarizer.transform(t) if kind in ("multiclass", "binary", "multilabel") else t.reshape(len(t), -1)
    loss, cg, ig = sklearn_backprop(est, X, Y)
    ours, our_cg, our_ig = sklearn_loss_and_grads(net, est, X, t)
    assert abs(ours - loss) <= TOL * abs(loss)
    for j, (a, b) in enumerate(zip(our_cg, cg)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=TOL * np.abs(b).max(), err_msg=f"coef_grads[{j}]")
    for j, (a, b) in enumerate(zip(our_ig, ig)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=TOL * np.abs(b).max(), err_msg=f"intercept_grads[{j}]")


def test_the_documented_regression_scaling(digits):
    """sklearn's squared-error gradient is n_outputs/2 × jacgrad's mse gradient (no L2 here)."""
    X, y = digits
    t = targets("regression-2", y, X)
    est = fit("regression-2", "tanh", X, t)
    est.set_params(alpha=0.0)
    net = jg.MLP.from_sklearn(est)
    loss, cg, _ = sklearn_backprop(est, X, t)
    value, g = net.loss_and_grads(X, t, loss="mse")
    assert abs(loss - float(value) / 2) <= TOL * loss
    np.testing.assert_allclose(cg[0], (t.shape[1] / 2) * g.weights[0], rtol=1e-10, atol=1e-14)


def test_copy_false_shares_coefs(digits):
    X, y = digits
    est = fit("multiclass", "relu", X, y)
    shared, copied = jg.MLP.from_sklearn(est, copy=False), jg.MLP.from_sklearn(est)
    for j, W in enumerate(est.coefs_):
        assert np.shares_memory(shared.weights[j], W) and not np.shares_memory(copied.weights[j], W)
        assert np.shares_memory(shared.biases[j], est.intercepts_[j])


def test_bad_estimators_say_why(digits):
    with pytest.raises(ValueError, match="not fitted: call fit"):
        jg.MLP.from_sklearn(MLPClassifier())
    from sklearn.linear_model import LogisticRegression

    with pytest.raises(TypeError, match="MLPClassifier or MLPRegressor, not LogisticRegression"):
        jg.MLP.from_sklearn(LogisticRegression())
    X, y = digits
    est = MLPRegressor(hidden_layer_sizes=(4,), loss="poisson", max_iter=5, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y.astype(float) + 1)
    with pytest.raises(ValueError, match="poisson.*out_activation_='exp'"):  # its exp output has no jacgrad row
        jg.MLP.from_sklearn(est)
