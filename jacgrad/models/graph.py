"""Any torch model in, by graph capture: ``jg.from_torch(model, example_inputs)`` and ``jg.explain``.

The model is traced with ``torch.export.export`` (ATen ops, ``linear`` and the norms kept whole);
each node is judged by the op table (``jacgrad.models.ops``), and the judged nodes are
walked back from the output into a chain of jacgrad layers:

- ``linear`` / ``addmm`` / ``mm`` / ``matmul`` with a parameter matrix (or its transpose), plus
  a bias ``add``: a ``Dense``; the activation right after it (views, eval dropout and copies in
  between compute nothing) becomes its activation;
- ``layer_norm`` / ``rms_norm`` over the last axis: ``LayerNorm`` / ``RMSNorm``;
- an activation anywhere else (after a norm, a residual join or another activation): an
  ``Activation`` layer of its own;
- an ``add`` whose one operand is computed from the other, ``x + s·f(x)`` (``s`` from a
  multiplication or division by a constant at the branch's end, or ``add``'s ``alpha``; ``x − f(x)``
  is ``s = −1``): a ``Residual`` around the layers of ``f``;
- an ``add`` of two branches from one value, ``p(x) + s·f(x)`` (a ResNet block's downsample: a
  strided 1×1 convolution and a batch norm): a ``Residual`` with the ``shortcut`` layers of ``p``
  (the scaled operand, else the longer one, is the branch ``f``). Around convolutions too: a
  torchvision ``BasicBlock`` (conv-BN-ReLU-conv-BN, + downsample) → add → ReLU is a ``Residual``
  and an image ``Activation``.

Refused, each with its node, op, module and source line: ops without a layer (all of them in one
``TypeError``; ``jg.explain`` shows the same verdicts as a table); graphs that are not a chain
of layers and residual blocks — concatenated skips, a value used by two branches, several outputs
— (a ``TypeError``; a general DAG of factors is not supported). A module used twice (one
``nn.ReLU``, one ``nn.Linear``) is applied in each place; a parameter used in several places (a
re-used ``nn.Linear``, tied weights) is ONE shared jacgrad parameter (``protocol.sharing``:
its gradient summed over the uses, P counting it once). Inputs and outputs are ``(B, n)``, or images ``(B, C, L)`` / ``(B, C, H, W)`` into a
convolution, pool, eval BatchNorm or Flatten (``convolution``, ``max_pool2d``, ``avg_pool2d``,
``adaptive_avg_pool2d(1)``, a mean over H, W, ``batch_norm``, a flatten to ``(B, C·H·W)``; an activation
after a convolution or BatchNorm fuses into it; the network's ``in_shape`` is the example's ``(C, H, W)``);
a residual join around convolutions, with an identity or a projection shortcut, is a ``Residual``. Token models
(``jacgrad.models.token_graph``): integer inputs ``(B, T)`` into an ``embedding`` (an ``Embedding``), ``(B, T, d)``
values through per-token layers, every attention block read whole as one ``MultiHeadAttention``, a transpose
``(B, T, d) -> (B, d, T)`` as ``TransposeTokens``, outputs ``(B, T, n_out)``.
A model torch cannot trace gets torch's own reason in one line (``RuntimeError``).

``copy=False`` shares the parameters' memory and checks it before each read, as
``Sequential.from_torch`` does (``jacgrad.io.interop.torch.TorchLink``): after ``model.double()`` or
``.to()`` the network raises instead of reading the old memory. As there, a missing bias is no
parameter (``nn.Linear(bias=False)``: ``Dense(W, bias=False)``; attention's ``bias=False``: no biases),
and a norm without affine parameters has none (``elementwise_affine=False``: ``affine=False``, γ the
constant ones): P is torch's.
"""

from __future__ import annotations

import os

from ..io.interop import require
from .explain import Explanation, Row, module_of, source_of, untraceable_error
from .ops import Piece, classify, op_name
from .token_graph import read_token_blocks

__all__ = ["Capture", "capture", "explain", "from_torch"]

_TRANSPOSES = ("t", "numpy_T", "transpose", "permute")


def _torch():
    return require("torch", "importing a torch model by graph capture", "pip install torch")


class Capture:
    """A traced model judged node by node: ``pieces`` (each node's ``torch_ops.Piece``), ``labels``
    (what each node became, for ``explanation()``), and once ``torch_chain.build_layers`` has run,
    ``layers``, ``origin`` and ``sources``: for each jacgrad parameter in the order of
    ``BlockGradients.flat``, ``(torch name, transposed)`` (``(None, False)`` for an array jacgrad would add:
    none does since bias-free layers come in without a bias)."""

    def __init__(self, model, example_inputs):
        torch = _torch()
        self.model, self.name, self.node = model, type(model).__name__, None
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise TypeError(f"example_inputs must be one tensor (B, n) or a tuple of one; got "
                            f"{[type(a).__name__ for a in args]}")
        if args[0].ndim not in (2, 3, 4):
            raise TypeError(f"example_inputs is {tuple(args[0].shape)}: jacgrad networks take (B, n) inputs, token "
                            f"ids (B, T) or token batches (B, T, d), or images (B, C, L) / (B, C, H, W) for "
                            f"convolutional models")
        self.in_shape = tuple(args[0].shape[1:]) if args[0].ndim > 2 else None
        ep = _export(torch, model, args)
        self.graph = ep.graph
        sig = ep.graph_signature
        self.param_names = dict(sig.inputs_to_parameters)
        self.buffer_names = dict(sig.inputs_to_buffers)
        data_inputs = set(sig.user_inputs)
        self.data: set = set()
        for n in self.graph.nodes:
            if (n.op == "placeholder" and n.name in data_inputs) or (
                    n.op == "call_function" and any(i in self.data for i in n.all_input_nodes)):
                self.data.add(n)
        torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
        self.pieces = {n: classify(n, self) for n in self.graph.nodes if n.op == "call_function"}
        read_token_blocks(self)  # attention blocks and positional embeddings, read whole
        for n, piece in self.pieces.items():  # the walk passes through an unsupported node to list what follows
            if piece.kind == "unsupported":
                piece.data = tuple(i for i in n.all_input_nodes if i in self.data)
        self._where = {n: (module_of(n), source_of(n, torch_dir)) for n in self.pieces}
        self.labels = {n: _label(p) for n, p in self.pieces.items()}
        self.layers, self.sources, self.problem, self.origin = None, [], "", None

    # ------------------------------------------------------------------ what torch_ops asks
    def arguments(self, node):
        from torch.fx.operator_schemas import normalize_function

        self.node = node  # a reader may ask for the shape of the node it reads
        norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        return None if norm is None else dict(norm.kwargs)

    def is_data(self, x) -> bool:
        return x in self.data if hasattr(x, "op") else False

    def shape(self, x) -> tuple:
        return tuple(x.meta["val"].shape)

    def param(self, x):
        """``(placeholder, transposed)`` when ``x`` is a parameter or a 2-D transpose of one, else None."""
        if not hasattr(x, "op"):
            return None
        if x.op == "placeholder":
            return (x, False) if x.name in self.param_names else None
        if x.op == "call_function" and op_name(x) in _TRANSPOSES and x.all_input_nodes:
            inner = self.param(x.all_input_nodes[0])
            if inner is not None and len(self.shape(x)) == 2:
                return inner[0], inner[1] != self._swaps(x)
        return None

    def buffer(self, x):
        """The placeholder ``x`` when it is a buffer of the model (batch norm's running statistics), else None."""
        return x if getattr(x, "op", None) == "placeholder" and x.name in self.buffer_names else None

    def _swaps(self, node) -> bool:
        """Whether the view ``node`` of a 2-D tensor swaps its axes (``transpose(0, 0)`` does not)."""
        a, name = self.arguments(node) or {}, op_name(node)
        if name == "transpose":
            return a["dim0"] % 2 != a["dim1"] % 2
        if name == "permute":
            return [d % 2 for d in a["dims"]] == [1, 0]
        return True  # t, numpy_T

    def dense(self, x, params: dict) -> Piece:
        return Piece("dense", (x,), params=params)

    # ------------------------------------------------------------------ the verdict
    def explanation(self) -> Explanation:
        rows = tuple(Row(n.name, op_name(n), self.labels[n], *self._where[n]) for n in self.pieces)
        net = "" if self.layers is None else f"Sequential([{', '.join(map(repr, self.layers))}])"
        return Explanation(self.name, rows, net, self.problem)

    def torch_names(self, placeholder) -> list[str]:
        """Every name the model gives the parameter of ``placeholder`` (tied ones have several)."""
        p = self.tensor(placeholder)
        return [k for k, q in self.model.named_parameters(remove_duplicate=False) if q is p]

    def tensor(self, placeholder):
        if placeholder.name in self.buffer_names:
            return self.model.get_buffer(self.buffer_names[placeholder.name])
        return self.model.get_parameter(self.param_names[placeholder.name])


def _export(torch, model, args):
    """``torch.export.export(model, args)``, or torch's reason in one line (a ``RuntimeError``).
    torch prints the partial graph of a failed trace to stderr on its way out: what it prints is
    held back, and written to stderr after all when the trace succeeds."""
    import contextlib
    import io
    import sys

    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            ep = torch.export.export(model, args)
    except Exception as exc:  # torch's reasons are many types; each becomes one line
        raise untraceable_error(model, exc) from None
    if held.getvalue():
        sys.stderr.write(held.getvalue())
    return ep


def _label(piece: Piece) -> str:
    """What a node is before the layers are assembled (assembly replaces it with its layer)."""
    if piece.kind == "unsupported":
        return f"unsupported: {piece.reason}"
    if piece.kind == "act":
        return f"activation {piece.info['name']}"
    if piece.info.get("unused"):
        return "nothing (its value never reaches the output)"
    if piece.kind == "layer":
        return piece.info["what"]
    if piece.info.get("part_of"):
        return f"part of {piece.info['part_of']} (read with the node it feeds)"
    return {"structural": "structural (no layer)", "param": "a view of a parameter (read by its use)",
            "inert": "nothing (no data flows through it)", "dense": "Dense", "bias": "the bias of a Dense",
            "layernorm": "LayerNorm", "rmsnorm": "RMSNorm", "add": "a residual join",
            "scale": "the scale of a residual branch", "conv": f"Conv{piece.info.get('dims')}d",
            "pool": "a pooling layer", "batchnorm": "BatchNorm (eval)", "flatten": "Flatten",
            "embedding": "Embedding", "attention": "MultiHeadAttention", "posemb": "PositionalEmbedding",
            "transpose_tokens": "TransposeTokens", "prelu": "PReLU"}[piece.kind]


def capture(model, example_inputs, copy: bool = True, dtype=None, build: bool = True) -> Capture:
    """Trace ``model`` and judge its nodes; with ``build``, also make its layers (``Capture.layers``)
    or raise the importer's errors (see the module docstring)."""
    cap = Capture(model, example_inputs)
    if build:
        from .chain import build_layers

        build_layers(cap, copy, dtype)
    return cap


def from_torch(model, example_inputs, copy: bool = False, dtype=None):
    """The ``jacgrad.Sequential`` computing the torch ``model`` (any ``nn.Module`` that
    ``torch.export`` traces and whose graph is a chain of layers and residual blocks; see the
    module docstring for what is read and what is refused). ``example_inputs``: one tensor
    ``(B, n)`` or ``(B, C, H, W)`` / ``(B, C, L)`` (or a tuple of one), used only to trace.
    ``copy=False`` (the default) shares the
    parameters' memory: an optimiser's in-place steps are seen, and a re-allocation
    (``model.double()``, ``.to()``) is an error at the next call; ``copy=True`` copies them.
    ``dtype``: cast every parameter to float32/float64 (a copy).

        >>> import torch, jacgrad as jg
        >>> class Block(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.inp, self.fc, self.out = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         h = torch.tanh(self.inp(x))
        ...         return self.out(h + 0.5 * torch.relu(self.fc(h)))
        >>> jg.from_torch(Block(), torch.ones(5, 3))
        Sequential([Dense(3->4, tanh), Residual([Dense(4->4, relu)], scale=0.5), Dense(4->2, identity)], float32)
    """
    from ..network.sequential import Sequential

    cap = capture(model, example_inputs, copy=copy, dtype=dtype)
    net = Sequential(cap.layers, in_shape=cap.in_shape)
    net._origin = cap.origin
    return net


def explain(model, example_inputs, file=None) -> Explanation:
    """Print and return (an ``Explanation``) how the graph importer reads ``model``: each node of
    its ``torch.export`` graph with its ATen op, the jacgrad layer it became or why it is
    unsupported, its torch module and its source ``file:line``; then the network, or why the nodes
    do not make one. ``file``: where to print (``sys.stdout``; ``False``: do not print). Parameters
    are not read (copy-free)."""
    import sys

    from .chain import build_layers

    cap = capture(model, example_inputs, build=False)
    try:
        build_layers(cap, copy=True, dtype=None)
    except (TypeError, ValueError) as exc:
        cap.problem = str(exc)
    out = cap.explanation()
    if file is not False:
        print(out, file=file or sys.stdout)
    return out
