"""Bring your own model: the constructors of ``Sequential`` and ``MLP`` from Flax and a
``jacgrad.io.interop.NetSpec``, and ``MLP``'s from scikit-learn (PyTorch: ``Sequential.from_torch``/
``to_torch``, which MLP inherits). Each framework is imported by ``jacgrad.io.interop`` only when
called. A spec's None bias is a bias-free layer: a ``Sequential`` keeps it (``Dense(W, bias=False)``),
an ``MLP`` (a bias in every layer, ``net.biases``) refuses it, naming the layer."""

from __future__ import annotations

from typing import TypeVar

__all__ = ["BIAS_FREE_HINT", "Imported", "InteropMethods"]

# what MLP.from_spec's refusal of a bias-free layer advises (the command line rewords it)
BIAS_FREE_HINT = ("build a jg.Sequential, which keeps it bias-free (jg.Sequential.load for a file, "
                  "jg.Sequential.from_flax for flax params)")

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

    @classmethod
    def from_spec(cls, spec):
        """The network of a ``jacgrad.io.interop.NetSpec``: one ``Dense`` per layer, bias-free where
        ``spec.biases[j]`` is None (its arrays are used as they are, not copied)."""
        from ..nn.dense import Dense

        net = cls([Dense(W, b, a, bias=b is not None) for W, b, a in zip(spec.weights, spec.biases, spec.activations)])
        net._origin = spec.origin
        return net

    @classmethod
    def from_flax(cls, params, activations, copy: bool = True):
        """The network of flax.linen ``Dense`` parameters ``{'Dense_0': {'kernel': (in, out),
        'bias': (out,)}, ...}`` (or ``{'params': {...}}``) in numeric layer order; a layer without
        ``'bias'`` (``use_bias=False``) is bias-free, which an ``MLP`` refuses (use
        ``jg.Sequential.from_flax``). ``activations``: one name, or one per Dense layer. See
        ``jacgrad.io.interop.flax``."""
        from .interop.flax import spec_from_flax

        return cls.from_spec(spec_from_flax(params, activations, copy=copy))

    def _check_origin(self) -> None:
        """Before any read of the parameters: the importer's check (a ``copy=False`` torch import
        raises once torch has re-allocated a parameter it shares: ``interop.torch.TorchLink``).
        Called at the two ends of every forward cache — ``forward``, which every product, report
        and ``__call__`` runs, and ``_check_cache``, which ``backward`` and ``jacobian_chain`` run."""
        if self._origin is not None:
            self._origin.check()


class InteropMethods(Imported):
    """``from_spec`` (a bias in every layer) and ``from_sklearn``: ``MLP``'s (``from_flax`` is
    ``Imported``'s, ``from_torch`` and ``to_torch`` are ``Sequential``'s: one importer for both networks)."""

    @classmethod
    def from_spec(cls: type[Net], spec) -> Net:
        """The network of a ``jacgrad.io.interop.NetSpec`` (its arrays are used as they are, not
        copied); a bias-free layer (a None bias) is a ``ValueError`` naming it and the way to keep it."""
        bare = [j for j, b in enumerate(spec.biases) if b is None]
        if bare:
            which = f"layer {bare[0]} has" if len(bare) == 1 else f"layers {', '.join(map(str, bare))} have"
            raise ValueError(f"{spec.source}: {which} no bias: an MLP has a bias in every layer (net.biases), and a "
                             f"zero bias would be a parameter the source does not have; {BIAS_FREE_HINT}")
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
