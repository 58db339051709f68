"""Old names that keep working: a module's ``__getattr__`` (PEP 562) that hands out the new object
under its old name and says so once per name, with a ``DeprecationWarning`` naming the new one.

    >>> import warnings
    >>> __getattr__ = renamed(__name__, {"OldThing": ("NewThing", int)})
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     __getattr__("OldThing") is int, __getattr__("OldThing") is int, len(w)
    (True, True, 1)
"""

from __future__ import annotations

import warnings

__all__ = ["renamed"]


def renamed(module: str, old: dict):
    """The ``__getattr__`` of ``module``: ``old`` maps an old name to ``(new name, object)``; any other
    name is the usual ``AttributeError``."""
    warned: set = set()

    def __getattr__(name: str):
        if name not in old:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new, obj = old[name]
        if name not in warned:
            warned.add(name)
            warnings.warn(f"{module}.{name} is renamed {new}; the old name still works but will go",
                          DeprecationWarning, stacklevel=2)
        return obj

    return __getattr__
