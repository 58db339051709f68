"""Bring your own model: ``MLP``'s constructors from scikit-learn, Flax and
``jacgrad.io.interop.NetSpec`` (PyTorch: ``Sequential.from_torch``/``to_torch``, which MLP inherits). ``MLP`` inherits these methods; each framework is imported by
``jacgrad.io.interop`` only when called."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["Imported", "InteropMethods"]

Net = TypeVar("Net", bound="InteropMethods")  # the class these are called on (MLP): no import of mlp


class Imported:
    """Where a network came from (``MLP`` and ``Sequential`` both): the ``jacgrad.io.interop.Origin``
    its importer left in ``_origin`` (None for a network built in jacgrad)."""

    _origin = None

    @property
    def imported_from(self) -> str | None:
        """The framework this network was imported from (``"torch"``, ``"sklearn"``, ``"flax"``), or
        None; read-only. Reports phrase their advice in that framework's words."""
        return None if self._origin is None else self._origin.framework

    def _check_origin(self) -> None:
        """Before any read of the parameters: the importer's check (a ``copy=False`` torch import
        raises once torch has re-allocated a parameter it shares: ``interop.torch.TorchLink``).
        Called at the two ends of every forward cache — ``forward``, which every product, report
        and ``__call__`` runs, and ``_check_cache``, which ``backward`` and ``jacobian_chain`` run."""
        if self._origin is not None:
            self._origin.check()


class InteropMethods(Imported):
    """``from_spec``, ``from_sklearn``, ``from_flax`` (``MLP``'s; ``from_torch`` and ``to_torch`` are
    ``Sequential``'s, one importer for both networks)."""

    @classmethod
    def from_spec(cls: type[Net], spec) -> Net:
        """The network of a ``jacgrad.io.interop.NetSpec`` (its arrays are used as they are, not copied)."""
        net = cls(spec.weights, spec.biases, spec.activations)
        net._origin = spec.origin
        return net

    @classmethod
    def from_sklearn(cls: type[Net], estimator, copy: bool = True) -> Net:
        """The network of a fitted ``MLPClassifier`` / ``MLPRegressor``: its ``coefs_`` and
        ``intercepts_``, hidden activation mapped (``logistic`` -> ``sigmoid``), output layer
        ``identity`` (sklearn's softmax/logistic belong to the loss; a poisson regressor's ``exp``
        output has no jacgrad activation and is a ``ValueError``). sklearn's loss conventions
        and the conversion: ``jacgrad.io.interop.sklearn``."""
        from .interop.sklearn import spec_from_sklearn

        return cls.from_spec(spec_from_sklearn(estimator, copy=copy))

    @classmethod
    def from_flax(cls: type[Net], params, activations, copy: bool = True) -> Net:
        """The network of flax.linen ``Dense`` parameters ``{'Dense_0': {'kernel': (in, out),
        'bias': (out,)}, ...}`` (or ``{'params': {...}}``) in numeric layer order;
        ``activations``: one name, or one per Dense layer. See ``jacgrad.io.interop.flax``."""
        from .interop.flax import spec_from_flax

        return cls.from_spec(spec_from_flax(params, activations, copy=copy))
