"""What one node of a traced graph is to the graph importer (``Piece``), shared by the op table's
modules (``jacgrad.models.ops``, ``jacgrad.models.ops_conv``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Piece"]


@dataclass
class Piece:
    """What one graph node is to the importer.

    ``kind``: ``"dense"`` (``params``: ``W`` and maybe ``b``, each ``(placeholder, transposed)``
    where ``transposed`` says the torch tensor is ``Wᵀ``), ``"bias"`` (a parameter added after
    a bias-free matmul), ``"act"`` (``info["name"]``), ``"layernorm"``/``"rmsnorm"``
    (``params`` gamma/beta, ``info["eps"]``), ``"add"`` (two data operands and ``info["alpha"]``:
    a residual join, or two branches from one value joining: a projection shortcut), ``"prelu"``
    (``params["weight"]``: its slopes), ``"scale"`` (times the constant ``info["scale"]``), ``"structural"``
    (computes nothing: views, eval dropout, copies), ``"layer"`` (one layer its reader makes:
    ``info["make"](arrays by role)``, ``info["what"]`` its label; ``jacgrad.models.ops_vit``), ``"param"`` (a view of a parameter, e.g. its
    transpose, read by the node that uses it), ``"inert"`` (no data flows through it: shape
    assertions), ``"unsupported"`` (``reason`` says why and what to do).
    ``data``: the node's data input(s), the values computed from the model's input. An
    activation spelled as several ops (softsign: ``abs``, ``add``, ``div``) is the ``"act"`` piece of
    its last node with ``info["parts"]``, its other nodes ``"inert"`` with ``info["part_of"]``."""

    kind: str
    data: tuple = ()
    params: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    reason: str = ""


def _unsupported(reason: str) -> Piece:
    return Piece("unsupported", reason=reason)
