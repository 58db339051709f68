"""DP-SGD on scikit-learn's ``load_digits`` with jacgrad: accuracy against ε for three noise
levels, next to the same training without privacy.

    python docs/examples/dp_digits.py            # about a minute on one CPU core

A 64-64-10 tanh MLP, Poisson sampling at rate q = 64 / N (the expected batch 64), per-sample
clipping at C = 1, noise σ·C, plain SGD; ε at δ = 1e-5 from Opacus' RDP accountant where Opacus is
installed (jacgrad does no accounting of its own). Every number is the mean over 3 seeds.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jacgrad as jg

EPOCHS, EXPECTED_BATCH, C, LR, DELTA = 40, 64, 1.0, 0.5, 1e-5
SIGMAS = [1.0, 2.0, 4.0]
SEEDS = [0, 1, 2]


def data():
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)


def train(Xtr, ytr, sigma: float | None, seed: int) -> jg.MLP:
    """``sigma`` None: non-private SGD on the same Poisson batches (mean gradient, no clipping)."""
    N = len(Xtr)
    q = EXPECTED_BATCH / N
    net = jg.MLP.init([64, 64, 10], activation="tanh", seed=seed, dtype="float32")
    rng = np.random.default_rng(seed)
    noise = np.random.Generator(np.random.SFC64(seed + 100))  # one generator: fresh noise every step
    for _ in range(int(EPOCHS / q)):
        idx = np.flatnonzero(rng.random(N) < q)  # Poisson sampling: a different B every step
        if idx.size == 0:
            continue
        x, t = Xtr[idx], ytr[idx]
        if sigma is None:
            g = net.loss_and_grads(x, t, loss="softmax_cross_entropy", input_grad=False)[1]
        else:
            g = net.clipped_grad(x, t, loss="softmax_cross_entropy", max_norm=C, noise_multiplier=sigma, seed=noise,
                                 expected_batch_size=EXPECTED_BATCH).grads
        for W, b, dW, db in zip(net.weights, net.biases, g.weights, g.biases):
            W -= LR * dW
            b -= LR * db
    return net


def epsilon(sigma: float, q: float, steps: int) -> float | None:
    try:
        from opacus.accountants import RDPAccountant
    except ImportError:
        return None
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    return acc.get_epsilon(delta=DELTA)


def main():
    Xtr, Xte, ytr, yte = data()
    q, steps = EXPECTED_BATCH / len(Xtr), int(EPOCHS / (EXPECTED_BATCH / len(Xtr)))
    print(f"load_digits: {len(Xtr)} train / {len(Xte)} test, q = {q:.4f}, {steps} steps ({EPOCHS} epochs), "
          f"C = {C}, lr = {LR}, delta = {DELTA}")
    print(f"{'noise multiplier':>18} {'epsilon':>9} {'test accuracy':>14}")
    for sigma in [None] + SIGMAS:
        acc = np.mean([(train(Xtr, ytr, sigma, s)(Xte).argmax(axis=1) == yte).mean() for s in SEEDS])
        eps = "inf" if sigma is None else (f"{epsilon(sigma, q, steps):.2f}" if epsilon(sigma, q, steps) else "n/a")
        print(f"{'non-private' if sigma is None else sigma:>18} {eps:>9} {acc:>14.3f}")


if __name__ == "__main__":
    main()
