"""The losses' arithmetic, written once, into buffers allocated once.

``jacgrad.nn.losses`` validates its arguments and runs these steps on a fresh workspace;
``TrainingStep`` (``jacgrad.steps.compiled``) keeps one workspace for the life of the step and runs
the very same steps every call. Every operation writes with ``out=`` into the workspace, and the
value stays a 0-d array on the device: nothing here allocates after construction, reads a
value back to the host or synchronises, so the whole loss can sit inside a captured CUDA graph.
Arguments are validated by the callers.

Shapes: ``y``, ``t``, ``grad``: ``S`` (``(B, C)`` for softmax cross-entropy); ``value``: ``()``;
``labels``: ``(B,)`` int64.
"""

from __future__ import annotations

__all__ = ["LossWorkspace", "NAMES"]

NAMES = ("mse", "sigmoid_bce", "softmax_cross_entropy")


class LossWorkspace:
    """``value``, ``grad`` = loss(y, t) for one loss name and output shape, into fixed buffers."""

    def __init__(self, name: str, xp, shape: tuple, dtype):
        if name not in NAMES:
            raise KeyError(f"unknown loss {name!r}; valid names: {', '.join(NAMES)}")
        self.name, self.xp = name, xp
        shape = tuple(shape)
        # every buffer is written before it is read (labels by the caller): empty, not zeros — an
        # eager loss makes a workspace per call, and each zeros is a memset kernel on the GPU
        self.value = xp.empty((), dtype=dtype)
        self.grad = xp.empty(shape, dtype=dtype)
        self._t1 = xp.empty(shape, dtype=dtype)
        self._t2 = xp.empty(shape, dtype=dtype) if name != "mse" else None
        self._t3 = xp.empty(shape, dtype=dtype) if name != "mse" else None
        if name == "sigmoid_bce":
            self._mask = xp.empty(shape, dtype=bool)
        if name == "softmax_cross_entropy":
            B, C = shape
            self._col = xp.empty((B, 1), dtype=dtype)
            self._picked = xp.empty(B, dtype=dtype)
            self.labels = xp.empty(B, dtype=xp.int64)
            self._flat = xp.empty(B, dtype=xp.int64)
            # b·C: one kernel, not two (arange, then a product); no classes: all 0
            self._row_start = xp.arange(0, B * C, C, dtype=xp.int64) if C else xp.zeros(B, dtype=xp.int64)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in vars(self).values() if hasattr(a, "nbytes")))

    def __call__(self, y, t, labels: bool = False) -> None:
        """Write ``value`` and ``grad``; ``t`` is the float target, or unused when ``labels``
        (softmax cross-entropy reading ``self.labels``)."""
        if self.name == "mse":
            self._mse(y, t)
        elif self.name == "sigmoid_bce":
            self._sigmoid_bce(y, t)
        else:
            self._softmax_cross_entropy(y, None if labels else t)

    def _mse(self, y, t) -> None:
        # r = y − t;  value = Σ r² / n;  grad = (2/n) · r
        xp, n = self.xp, y.size
        r = xp.subtract(y, t, out=self.grad)
        xp.multiply(r, r, out=self._t1)
        self._t1.sum(out=self.value)
        xp.divide(self.value, n, out=self.value)
        xp.multiply(r, 2 / n, out=self.grad)

    def _sigmoid_bce(self, z, t) -> None:
        # value = Σ[max(z,0) − z·t + log1p(e)] / n, e = exp(−|z|);
        # grad = (σ(z) − t) / n with the overflow-free σ = where(z ≥ 0, 1/(1+e), e/(1+e)).
        xp, n = self.xp, z.size
        e, a, b = self._t1, self._t2, self._t3
        xp.abs(z, out=e)
        xp.negative(e, out=e)
        xp.exp(e, out=e)
        xp.maximum(z, 0, out=a)
        xp.multiply(z, t, out=b)
        xp.subtract(a, b, out=a)
        xp.log1p(e, out=b)
        xp.add(a, b, out=a)
        a.sum(out=self.value)
        xp.divide(self.value, n, out=self.value)
        xp.add(e, 1, out=a)                  # 1 + e
        xp.divide(1, a, out=b)               # 1 / (1 + e)
        xp.divide(e, a, out=e)               # e / (1 + e)
        xp.greater_equal(z, 0, out=self._mask)
        xp.copyto(e, b, where=self._mask)    # σ(z)
        xp.subtract(e, t, out=self.grad)
        xp.divide(self.grad, n, out=self.grad)

    def _softmax_cross_entropy(self, z, T) -> None:
        # logp = shifted − log Σ exp(shifted), shifted = z − max z;
        # labels: value = −Σ logp[b, label_b] / B, grad = (p − onehot) / B;
        # rows T: value = −Σ T·logp / B, grad = (p · rowsum(T) − T) / B.
        xp, B = self.xp, z.shape[0]
        shifted, logp, col = self._t1, self._t2, self._col
        z.max(axis=1, keepdims=True, out=col)
        xp.subtract(z, col, out=shifted)
        xp.exp(shifted, out=logp)
        logp.sum(axis=1, keepdims=True, out=col)
        xp.log(col, out=col)
        xp.subtract(shifted, col, out=logp)
        p = xp.exp(logp, out=self.grad)
        if T is None:
            xp.add(self._row_start, self.labels, out=self._flat)     # flat index of (b, label_b)
            xp.take(logp, self._flat, out=self._picked)
            self._picked.sum(out=self.value)
            xp.take(p, self._flat, out=self._picked)
            xp.subtract(self._picked, 1, out=self._picked)
            xp.put(p, self._flat, self._picked)
        else:
            xp.multiply(T, logp, out=self._t3)
            self._t3.sum(out=self.value)
            T.sum(axis=1, keepdims=True, out=col)
            xp.multiply(p, col, out=p)
            xp.subtract(p, T, out=p)
        xp.negative(self.value, out=self.value)
        xp.divide(self.value, B, out=self.value)
        xp.divide(p, B, out=p)
