"""Example network files shipped with jacgrad.

``TINY_MLP`` is ``tiny_mlp.npz``: a 8 → 16 → 16 → 3 network (tanh, tanh, identity) in the
format ``jacgrad report --weights`` reads — arrays ``W0, b0, W1, b1, W2, b2`` (``Wj`` is
``(H_{j-1}, H_j)``, ``bj`` is ``(H_j,)``) and a string array ``activations`` with one name per
layer. It was written by ``jacgrad.MLP.init([8, 16, 16, 3], activation="tanh",
init="xavier_normal", bias_std=0.1, seed=0).save(path)``.

    >>> import jacgrad as jg
    >>> from jacgrad.examples import TINY_MLP
    >>> jg.MLP.load(TINY_MLP).sizes
    [8, 16, 16, 3]
"""

from pathlib import Path

__all__ = ["TINY_MLP", "path"]

_HERE = Path(__file__).resolve().parent
TINY_MLP = str(_HERE / "tiny_mlp.npz")


def path(name: str = "tiny_mlp.npz") -> str:
    """The absolute path of the example file ``name``."""
    p = _HERE / name
    if not p.is_file():
        names = ", ".join(sorted(q.name for q in _HERE.glob("*.npz")))
        raise FileNotFoundError(f"no example {name!r}; available: {names}")
    return str(p)
