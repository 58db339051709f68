"""Checks of derivatives: finite differences, the adjoint (dot-product) test, backend comparison.

Every check works in float64 on the host. Arrays that live on the GPU (CuPy) are copied to
NumPy explicitly, with ``jacgrad.to_numpy``, at the points documented in each function: a
check never depends on the device, so the same check grades the CPU and the GPU paths.

    >>> import numpy as np
    >>> from jacgrad.algebra.check import numerical_jacobian
    >>> numerical_jacobian(np.sin, np.zeros(2)).round(8)
    array([[1., 0.],
           [0., 1.]])
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..core.validation import shape_str
from ..core.backend import to_device, to_numpy

__all__ = ["check_adjoint", "check_vjp", "compare_backends", "numerical_jacobian", "relative_error"]

_TINY = np.finfo(np.float64).tiny


def _host64(a: Any) -> np.ndarray:
    """``a`` as a fresh float64 NumPy array (copied off the GPU when it is a CuPy array)."""
    return np.array(to_numpy(a), dtype=np.float64)


def numerical_jacobian(f: Callable, x: Any, eps: float = 1e-6) -> np.ndarray:
    """The Jacobian of ``f`` at ``x`` by central differences in float64.

    ``x``: any shape ``S`` (NumPy or CuPy, any float dtype); it is copied to the host as float64
    and ``f`` is called with float64 NumPy arrays of shape ``S``. ``f`` returns an array of any
    shape ``T`` (a CuPy result is copied to the host). Returns ``J`` of shape ``T + S`` with
    ``J[j..., i...] = ∂f(x)[j...] / ∂x[i...]``.

    The step for ``x[i]`` is ``eps · max(1, |x[i]|)``, so it is relative for large entries and
    absolute near zero; the divisor is the step actually taken in floating point. With the
    default ``eps = 1e-6`` the error is about ``1e-10 · |f|`` for smooth ``f``.

    To check a function that only runs on the GPU, wrap it:
    ``lambda x: f_gpu(jacgrad.to_device(x, "gpu"))``.

        >>> import numpy as np
        >>> A = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> numerical_jacobian(lambda x: A @ x, np.ones(2)).round(8)
        array([[1., 2.],
               [3., 4.]])
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    x = _host64(x)
    y = _host64(f(x.copy()))
    J = np.empty(y.shape + x.shape)
    columns = J.reshape(y.size, x.size)  # a view: filling a column fills J
    for i in range(x.size):
        h = eps * max(1.0, abs(x.flat[i]))
        up, down = x.copy(), x.copy()
        up.flat[i] += h
        down.flat[i] -= h
        # Divide by the step that the rounding of x ± h really produced, not by 2h.
        columns[:, i] = (_host64(f(up)) - _host64(f(down))).reshape(-1) / (up.flat[i] - down.flat[i])
    return J


def _adjoint_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), _TINY)


def _require_shape(what: str, got: tuple, want: tuple, of: str) -> None:
    if got != want:
        raise ValueError(f"{what} has shape {shape_str(got)} but {of} has shape {shape_str(want)}")


def check_vjp(
    f: Callable, vjp: Callable, x: Any, v: Any = None, u: Any = None, seed: int = 0, eps: float = 1e-6
) -> float:
    """The adjoint (dot-product) test of a VJP against ``f``: relative error of ⟨v, J u⟩ = ⟨Jᵀ v, u⟩.

    ``x``: shape ``S``; ``f(x)``: shape ``T``; ``vjp(v)`` takes ``v: T`` and returns ``Jᵀ v: S``,
    the VJP of ``f`` at ``x``. ``u: S`` and ``v: T`` are drawn standard normal (``seed``) unless
    given. ``J u`` comes from one central difference along ``u`` in float64,
    ``(f(x + t·u) − f(x − t·u)) / 2t`` with ``t = eps · max(1, max|x|) / max|u|``, so the
    perturbation is ``eps`` relative to the largest entry of ``x``. Returns
    ``|⟨v, Ju⟩ − ⟨Jᵀv, u⟩| / max(|⟨v, Ju⟩|, |⟨Jᵀv, u⟩|, tiny)``: about ``1e-10`` for a correct
    float64 VJP of a smooth ``f``, about ``1e-7`` for a float32 one, order one for a wrong one.

    Everything runs on the host: ``x``, ``u``, ``v`` are copied to float64 NumPy, ``f`` and ``vjp``
    are called with float64 NumPy arrays and their results are copied to the host.

        >>> import numpy as np
        >>> A, x0 = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.1, -0.2])
        >>> f = lambda x: np.tanh(A @ x)
        >>> vjp = lambda v: A.T @ (v * (1 - f(x0) ** 2))
        >>> check_vjp(f, vjp, x0) < 1e-8
        True
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive; got {eps}")
    x = _host64(x)
    y = _host64(f(x.copy()))
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(x.shape) if u is None else _host64(u)
    v = rng.standard_normal(y.shape) if v is None else _host64(v)
    _require_shape("u", u.shape, x.shape, "x")
    _require_shape("v", v.shape, y.shape, "f(x)")
    u_max = float(np.abs(u).max()) if u.size else 0.0
    if u_max == 0.0:
        Ju = np.zeros(y.shape)
    else:
        t = eps * max(1.0, float(np.abs(x).max())) / u_max
        Ju = (_host64(f(x + t * u)) - _host64(f(x - t * u))) / (2 * t)
    JTv = _host64(vjp(v.copy()))
    _require_shape("vjp(v)", JTv.shape, x.shape, "x")
    return _adjoint_error(float(np.vdot(v, Ju)), float(np.vdot(JTv, u)))


def check_adjoint(jvp: Callable, vjp: Callable, u: Any, v: Any) -> float:
    """The exact adjoint test between a JVP and a VJP: relative error of ⟨v, jvp(u)⟩ = ⟨vjp(v), u⟩.

    ``u``: shape ``S`` (input side), ``v``: shape ``T`` (output side); ``jvp(u)`` must return shape
    ``T`` and ``vjp(v)`` shape ``S``. No differences are taken, so for a correct pair the error is
    rounding only (about ``1e-15`` in float64, ``1e-7`` in float32). ``jvp`` and ``vjp`` are called
    with ``u`` and ``v`` as given, on their own backend; the results are copied to the host and
    the inner products taken in float64. Returns
    ``|⟨v, Ju⟩ − ⟨Jᵀv, u⟩| / max(|⟨v, Ju⟩|, |⟨Jᵀv, u⟩|, tiny)``.

        >>> import numpy as np
        >>> A = np.arange(6.0).reshape(2, 3)
        >>> check_adjoint(lambda u: A @ u, lambda v: A.T @ v, np.ones(3), np.ones(2)) < 1e-15
        True
    """
    Ju = _host64(jvp(u))
    _require_shape("jvp(u)", Ju.shape, np.shape(v), "v")
    JTv = _host64(vjp(v))
    _require_shape("vjp(v)", JTv.shape, np.shape(u), "u")
    u, v = _host64(u), _host64(v)
    return _adjoint_error(float(np.vdot(v, Ju)), float(np.vdot(JTv, u)))


def relative_error(a: Any, b: Any) -> float:
    """``max|a − b| / max|b|``: the error of ``a`` relative to the reference ``b``.

    ``a`` and ``b``: arrays of the same shape on any backend (CuPy arrays are copied to the
    host); compared in float64. When ``b`` is all zeros the absolute error ``max|a − b|`` is
    returned; empty arrays give ``0.0``; a NaN in either gives NaN (so ``err <= tol`` fails).

        >>> import numpy as np
        >>> relative_error(np.array([1.0, 2.1]), np.array([1.0, 2.0]))  # doctest: +ELLIPSIS
        0.05000...
    """
    a, b = _host64(a), _host64(b)
    _require_shape("a", a.shape, b.shape, "the reference b")
    if a.size == 0:
        return 0.0
    scale = float(np.abs(b).max())
    err = float(np.abs(a - b).max())
    return err / scale if scale > 0 else err


def _outputs(result: Any) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _is_array(a: Any) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape")


def compare_backends(fn: Callable, *args: Any, device: str = "gpu") -> float:
    """Worst relative error of ``fn`` run on ``device`` against ``fn`` on float64 NumPy.

    ``fn(*args)`` returns an array or a tuple/list of arrays (such as a loss's
    ``(value, gradient)``). The reference run gets every float array of ``args`` as float64
    NumPy; the candidate run gets every array moved to ``device`` (``"gpu"`` or ``"cpu"``) with
    its dtype kept, so float32 arguments measure float32 against the float64 reference.
    Integer arrays (labels) keep their dtype in both runs; other arguments pass unchanged.
    Returns the largest ``relative_error`` over the outputs. ``device="gpu"`` where no GPU
    runs is the ``RuntimeError`` of ``jacgrad.to_device``.

        >>> import numpy as np
        >>> x = np.linspace(-1, 1, 5, dtype=np.float32)
        >>> compare_backends(np.tanh, x, device="cpu") < 1e-6
        True
    """
    def reference(a):
        if not _is_array(a):
            return a
        a = to_numpy(a)
        return a.astype(np.float64) if a.dtype.kind == "f" else a

    expected = _outputs(fn(*[reference(a) for a in args]))
    got = _outputs(fn(*[to_device(a, device) if _is_array(a) else a for a in args]))
    if len(got) != len(expected):
        raise ValueError(f"fn returned {len(got)} outputs on {device} but {len(expected)} on the reference")
    return max((relative_error(g, e) for g, e in zip(got, expected)), default=0.0)
