"""``LayerList``: the per-layer list type of a network (``MLP.weights``, ``.biases``,
``.activations``) whose item assignment is validated, so the list handed out IS what the
computation reads."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Callable

__all__ = ["LayerList"]


class LayerList(Sequence):
    """A fixed-length sequence, one entry per layer, whose item assignment is validated.

    A network's public per-layer list (``net.weights``, ``net.biases``,
    ``net.activations``) that IS what the computation reads, and validates what is put in it.

    A plain Python list handed out as ``net.weights`` could be changed in ways the network never
    checks: a weight of the wrong shape or dtype fails later inside a matmul, an appended layer is
    half a layer, and a copy kept beside it drifts (``net.activations[0] = "relu"`` while forward
    still ran tanh). A ``LayerList`` has one entry per layer, for the network's whole life:

    - ``lst[j] = value`` runs the network's check for layer ``j`` first and stores the value only
      if it passes (an error names the layer; nothing is changed);
    - the number of layers is fixed: ``append``, ``extend``, ``insert``, ``pop``, ``remove``,
      ``clear``, ``del``, ``+=``, ``*=`` and slice assignment raise ``TypeError``;
    - reading is a list's: ``lst[j]``, ``lst[1:]`` (a plain list), ``len``, iteration, ``in``,
      ``==`` against a list or tuple, ``lst + other`` (a plain list), ``list(lst)``.

        >>> lst = LayerList([1, 2], "weights", lambda j, v: v)
        >>> lst[0] = 5; lst, lst + [3]
        ([5, 2], [5, 2, 3])
        >>> lst.append(3)
        Traceback (most recent call last):
        ...
        TypeError: net.weights has one entry per layer and its length is fixed (2 layers): append is not supported; build a new MLP to change the layers

    items: the entries as stored. what: the attribute's name, for messages (``"weights"``).
    check(j, value) -> stored: validates a new entry for layer ``j`` (raising an error that
    names the layer) and returns what to store. show(stored) -> what reading returns (default:
    the stored entry itself; ``activations`` stores resolved rows and shows their names).
    """

    __slots__ = ("_items", "_what", "_check", "_show")

    def __init__(self, items, what: str, check: Callable[[int, Any], Any], show: Callable[[Any], Any] | None = None):
        self._items, self._what, self._check, self._show = list(items), what, check, show

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._view(v) for v in self._items[i]]
        return self._view(self._items[i])

    def __iter__(self):
        return iter([self._view(v) for v in self._items]) if self._show else iter(self._items)

    def _view(self, v):
        return v if self._show is None else self._show(v)

    @property
    def stored(self) -> list:
        """The entries as stored (a new list), e.g. the resolved ``Activation`` rows."""
        return list(self._items)

    def __eq__(self, other):
        if isinstance(other, (LayerList, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # mutable

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def copy(self) -> list:
        """A plain list of the entries (the arrays themselves, not copies of them)."""
        return list(self)

    def __repr__(self) -> str:
        return repr(list(self))

    # ---------------------------------------------------------------- writing
    def __setitem__(self, i, value) -> None:
        if isinstance(i, slice):
            raise TypeError(
                f"net.{self._what}[{_slice_str(i)}] = …: slice assignment is not supported; assign one layer at "
                f"a time (net.{self._what}[j] = …)"
            )
        n = len(self._items)
        j = operator.index(i)
        if not -n <= j < n:
            raise IndexError(f"net.{self._what}[{j}]: the network has {n} layers (0 … {n - 1})")
        j %= n
        self._items[j] = self._check(j, value)

    def _fixed(self, op: str):
        raise TypeError(
            f"net.{self._what} has one entry per layer and its length is fixed ({len(self._items)} layers): "
            f"{op} is not supported; build a new MLP to change the layers"
        )

    def __delitem__(self, i):
        self._fixed("del")

    def append(self, value):
        self._fixed("append")

    def extend(self, values):
        self._fixed("extend")

    def insert(self, i, value):
        self._fixed("insert")

    def pop(self, i=-1):
        self._fixed("pop")

    def remove(self, value):
        self._fixed("remove")

    def clear(self):
        self._fixed("clear")

    def sort(self, *args, **kwargs):
        self._fixed("sort")

    def reverse(self):
        self._fixed("reverse")

    def __iadd__(self, other):
        self._fixed("+=")

    def __imul__(self, other):
        self._fixed("*=")


def _slice_str(s: slice) -> str:
    parts = ["" if v is None else str(v) for v in (s.start, s.stop)]
    return ":".join(parts) + ("" if s.step is None else f":{s.step}")
