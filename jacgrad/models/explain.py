"""What one node of a traced graph is to the graph importer (``Piece``, shared by the op table's
modules ``jacgrad.models.ops*``), what ``jg.explain`` returns, and the graph importer's messages
in the user's words: a node's source line, the one-line reason torch gives when it cannot trace a model, the one error that
lists every unsupported part.

Nothing here imports torch: a node is read through its ``meta`` (``stack_trace``,
``nn_module_stack``), which ``torch.export`` fills in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..io.interop import plain_message

__all__ = ["Explanation", "Piece", "Row", "module_of", "source_of", "unsupported_error", "untraceable_error"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*(?:\n\s+([^\n]*))?')


@dataclass(frozen=True)
class Row:
    """One graph node: its ``node`` name, its ATen ``op``, the jacgrad ``layer`` it became
    (``"layer 1.0: Dense(4->4, relu)"``, ``"structural (no layer)"``, or ``"unsupported: <why>"``),
    the torch ``module`` it ran in (``"blocks.0.fc (Linear)"``) and its ``source`` (``file:line``)."""

    node: str
    op: str
    layer: str
    module: str
    source: str

    @property
    def supported(self) -> bool:
        return not self.layer.startswith("unsupported")


@dataclass(frozen=True)
class Explanation:
    """The verdict of the graph importer on every node of a model's ``torch.export`` graph.
    ``rows``: one ``Row`` per computing node, in graph order; ``unsupported``: those no
    jacgrad layer takes; ``network``: the imported network's repr, or why the nodes do not make
    one (``problem``). ``str()`` is the table ``jg.explain`` prints."""

    model: str
    rows: tuple
    network: str = ""
    problem: str = ""

    @property
    def unsupported(self) -> tuple:
        return tuple(r for r in self.rows if not r.supported)

    def __str__(self) -> str:
        head = ("node", "op", "jacgrad layer", "module", "source")
        cells = [head] + [(r.node, r.op, r.layer, r.module, r.source) for r in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        lines = [f"{self.model}: {len(self.rows)} nodes, {len(self.unsupported)} unsupported"]
        for k, c in enumerate(cells):
            lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.network:
            lines.append(f"network: {self.network}")
        if self.problem:
            lines.append(f"not importable: {self.problem}")
        return "\n".join(lines)


def source_of(node, torch_dir: str) -> str:
    """``file:line`` of the user's code that made ``node``: the innermost frame of its
    ``stack_trace`` outside torch itself (``torch_dir``), else the innermost frame; ``"?"``."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if not frames:
        return "?"
    own = [f for f in frames if not os.path.abspath(f[0]).startswith(torch_dir)]
    path, line, _ = (own or frames)[-1]
    return f"{path}:{line}"


def module_of(node) -> str:
    """The torch module ``node`` ran in, ``"blocks.0.fc (Linear)"`` (its innermost entry of
    ``nn_module_stack``), or ``""`` at the model's own ``forward``."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        if path:
            cls = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            return f"{path} ({cls.rpartition('.')[2]})"
    return ""


def untraceable_error(model, exc: BaseException) -> RuntimeError:
    """torch's reason for refusing to trace ``model`` in one line: the first line of its message,
    and the user's line it names (``at model.py:12: if x.sum() > 0:``) when it names one."""
    text = plain_message(exc)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    where = ""
    tail = text.rpartition("The following call raised this error:")[2]
    frames = _FRAME.findall(tail) if tail != text else []
    if frames:
        path, line, code = frames[-1]
        where = f" (at {path}:{line}: {code.strip()})" if code else f" (at {path}:{line})"
    return RuntimeError(f"torch.export cannot trace {type(model).__name__}: {type(exc).__name__}: {first}{where}. "
                        f"jacgrad imports what torch.export traces: write the data-dependent part without Python "
                        f"control flow on tensor values (torch.where, torch.cond), or leave it out")


def unsupported_error(explanation: Explanation, note: str = "") -> TypeError:
    """One ``TypeError`` listing every unsupported node of ``explanation`` with its op, module,
    source and what to do; ``note``: what else stops the import (the graph is not a chain)."""
    bad = explanation.unsupported
    lines = [f"{explanation.model} has {len(bad)} part{'s' * (len(bad) != 1)} jacgrad cannot import:"]
    for r in bad:
        at = ", ".join(v for v in (r.module, r.source) if v)
        lines.append(f"  - node {r.node} (aten.{r.op}{', ' + at if at else ''}): {r.layer.removeprefix('unsupported: ')}")
    if note:
        lines.append(f"and besides: {note}")
    lines.append("jg.explain(model, example_inputs) shows how every node is read; "
                 "jacgrad.models.ops.supported_ops_markdown() lists the ops it takes")
    return TypeError("\n".join(lines))


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
