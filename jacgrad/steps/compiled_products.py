"""Compiled parameter-space products: ``net.compile(B, product=...)`` for every product.

One spelling for all of them, the training step's (``product="step"``, the default, is
``jacgrad.steps.compiled.TrainingStep``):

- ``"grad_norms"``: ``step(x, target)`` → ``(B,)``, or ``(B, L)`` with ``per_layer=True``;
- ``"grads"``: ``step(x, target)`` → ``Gradients`` (``flat: (B, P)`` and its views);
- ``"ntk"``: ``step(x)`` or ``step(x1, x2)`` → ``(N1, N2, O, O)``, ``(N1, N2)`` with ``trace=True``;
- ``"ggn_vp"``: ``step(x, v)`` → ``(P,)``, ``G v``;
- ``"ggn_diagonal"``: ``step(x)`` → ``Gradients`` (``flat: (P,)``).

The NTK's batch is ``batch=N`` for the kernel of one batch with itself (``K(x, x)``, called
``step(x)``: the eager ``jg.ntk(net, x)``, which computes the blocks on and above the diagonal
only) or ``batch=(N1, N2)`` for two batches (``step(x1, x2)``). ``"per_sample_grad_norms"`` and
``"per_sample_grads"`` are other names of the first two. The Gauss–Newton products take no
target: they are the eager products with ``target=None`` (the loss Hessian of mse and sigmoid_bce
does not depend on it; softmax cross-entropy's is that of labels or probability rows summing to 1).

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([4, 8, 3], seed=0)
    >>> norms = net.compile(2, product="grad_norms", loss="mse")
    >>> x, t = np.ones((2, 4)), np.zeros((2, 3))
    >>> bool((norms(x, t) == jg.per_sample_grad_norms(net, x, t)).all())
    True
    >>> K = net.compile(2, product="ntk", trace=True)(x)      # (2, 2)
    >>> bool((K == jg.ntk(net, x, trace=True)).all())
    True

The code is the eager products' own (``SequentialParameterSpace.per_sample_grad_norms``,
``per_sample_grads``, ``ggn_vp``, ``ggn_diagonal`` and ``jacgrad.params.ntk.ntk``), called on the
step's static input buffers with ``out=`` the step's result buffer; nothing is re-implemented.
So on NumPy the numbers are BITWISE the eager products' (the same operations on the same
C-contiguous inputs; ``ggn_vp`` copies the backward's block into the buffer, the others write into
it), and a NumPy step is the same object as a CuPy one, running eagerly into its buffers.

The contract is the compiled steps' (``jacgrad.steps.compiled``):

- buffers once: the inputs (``x``, the target or integer labels, ``x2``, ``v``) are copied into
  static buffers — same device (a ``TypeError`` otherwise, never a silent copy), dtypes castable
  to the network's (ints to floats as ``forward`` does; token ids as the ``Embedding`` checks
  them), exactly the compiled shapes (a ``ValueError`` naming them otherwise).
- the result IS the step's buffer, overwritten by the next call (from any thread); ``copy=True``
  returns fresh arrays, copied under the step's lock. Threads sharing a step pass ``copy=True``.
  The product's temporaries are the eager code's: allocated per call on NumPy, from the graph's
  private pool on CuPy; the results never alias memory the library reads later.
- parameters by reference: in-place updates are seen by the next call; a replaced array or
  layer raises ``RuntimeError`` naming it until ``step.rebind()``.
- ``capture="auto"``: on CuPy, the first call runs eagerly (warm-up), then records one CUDA graph
  through the direct-cuBLAS path (``jacgrad.cuda.gemm``: every GEMM of every layer — dense, token,
  attention, convolution, embedding — goes through ``matmul``/``matmul_into``), with no host read
  (labels and token ids are checked at load, ``ids_checked``). A piece that still fails under
  capture makes ``"auto"`` run without a graph from that call on, ``step.capture_error`` naming the
  function that raised; ``capture=True`` raises ``CaptureError``. Not yet run on a GPU: the
  fake-CuPy tests (``tests/test_compiled_capture_layers.py``, ``tests/test_compiled_products.py``)
  run what a capture runs with CuPy's matmul refused and check the numbers and that nothing is
  read back.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.validation import ids_checked, network_input, shape_str
from ..nn import losses
from ..params import ntk as _ntk
from ..params.leaf_views import named_views
from ..protocol.layer import anchor, layer_leads, lead_shape
from ..protocol.leaves import check_method
from ..protocol.passes import Gradients
from ..algebra.per_sample import check_direction
from .step_io import IdentityBinding, StepIO, check_batch_and_capture, check_tokens_arg, param_binding

__all__ = ["PRODUCTS", "ProductStep", "canonical_product", "compile_step"]

PRODUCTS = ("step", "grad_norms", "grads", "ntk", "ggn_vp", "ggn_diagonal")
_ALIASES = {"per_sample_grad_norms": "grad_norms", "per_sample_grads": "grads", "training": "step"}
_CALLS = {"grad_norms": "step(x, target)", "grads": "step(x, target)", "ggn_vp": "step(x, v)",
          "ggn_diagonal": "step(x)"}
_OPTIONS = {"grad_norms": ("loss", "per_layer", "method"), "grads": ("loss",), "ntk": ("trace", "max_memory"),
            "ggn_vp": ("loss",), "ggn_diagonal": ("loss", "max_memory")}  # what each product reads
_DEFAULT = object()  # max_memory not given: the eager product's default (the same chunks, the same numbers)


def canonical_product(product: Any) -> str:
    """``product`` as one of ``PRODUCTS`` (aliases: ``per_sample_grad_norms``, ``per_sample_grads``);
    a ``ValueError`` listing them otherwise."""
    name = _ALIASES.get(product, product) if isinstance(product, str) else None
    if name not in PRODUCTS:
        raise ValueError(f"product {product!r} has no compiled form; valid names: {', '.join(PRODUCTS)} "
                         f"(also {', '.join(_ALIASES)})")
    return name


class _Labels:
    """Where ``StepIO._load_target`` puts integer labels of softmax cross-entropy: ``labels (B,)``."""

    def __init__(self, xp, B: int):
        self.labels = xp.zeros(B, dtype=xp.int64)


class ProductStep(IdentityBinding, StepIO):
    """A compiled parameter-space product (module docstring): ``net.compile(batch, product=...)``.

    net: an ``MLP`` or a ``Sequential`` (any layers), NumPy or CuPy. batch: B (the NTK: N or
    ``(N1, N2)``). product: a name of ``PRODUCTS`` but ``"step"``. loss: for ``grad_norms``,
    ``grads``, ``ggn_vp``, ``ggn_diagonal``. tokens: T of token batches ``(B, T, ·)`` (or ids
    ``(B, T)``). per_layer, method: as ``per_sample_grad_norms``; trace: as ``ntk``; max_memory:
    as the eager product (not given: its default, so the chunks and numbers are the same).
    """

    _what = "compiled product"

    def __init__(self, net, batch: Any, product: str, loss: str = "mse", capture: Any = "auto", *,
                 tokens: Any = None, per_layer: bool = False, method: str = "auto", trace: bool = False,
                 max_memory: Any = _DEFAULT):
        if not hasattr(net, "per_sample_grad_norms") or not hasattr(net, "layers"):
            raise TypeError(f"net.compile(product=...) compiles an MLP or a Sequential, not a {type(net).__name__}")
        self.product = product = canonical_product(product)
        if product == "step":
            raise ValueError("product='step' is the training step: jacgrad.steps.compiled.TrainingStep")
        xp, dt = net.xp, np.dtype(net.dtype)
        self._gpu = xp is not np
        pair = product == "ntk" and isinstance(batch, (tuple, list))
        if pair and len(batch) != 2:
            raise ValueError(f"the NTK's batch is N or (N1, N2), got {batch!r}")
        sizes = [check_batch_and_capture(b, capture, self._gpu) for b in (batch if pair else (batch,))]
        self.batch = tuple(sizes) if pair else sizes[0]
        self.loss = losses.canonical(loss)
        losses.get(self.loss)  # a KeyError listing the losses for an unknown name
        self.tokens = check_tokens_arg(tokens, "mse" if product == "ntk" else self.loss, False, net.layers)
        self.per_layer, self.method, self.trace = bool(per_layer), check_method(method), bool(trace)
        self._net, self._xp, self.dtype, self._capture = net, xp, dt, capture
        self.capture_error: str | None = None  # why capture="auto" fell back to running without a graph
        self._kw = {} if max_memory is _DEFAULT else {"max_memory": max_memory}
        if product in ("grads",) and max_memory is not _DEFAULT:
            raise ValueError("product='grads' writes (B, P) into the step's own buffer: it takes no max_memory")
        given = [name for name, value, default in (("loss", loss, "mse"), ("per_layer", per_layer, False),
                                                   ("method", method, "auto"), ("trace", trace, False),
                                                   ("max_memory", max_memory, _DEFAULT))
                 if value is not default and value != default]
        unused = [name for name in given if name not in _OPTIONS[product]]
        if unused:  # never a silent drop (net.compile names unknown options first: compile_step)
            raise TypeError(f"product={product!r} takes {', '.join(_OPTIONS[product])}, not {', '.join(unused)}")
        self._bound = param_binding(net)
        self._device = anchor(net.layers).device if self._gpu else None
        layers = list(net.layers)
        self._ids = getattr(layers[0], "check_tokens", None) if self.tokens is not None else None
        in_shape = tuple(getattr(net, "in_shape", None) or (net.n_in,))
        T = self.tokens
        self._target = self._x2 = self._v = self._loss = None
        with self._on_device():
            self._x = self._input_buffer(sizes[0], in_shape)
            if pair:
                self._x2 = self._input_buffer(sizes[1], in_shape)
            B, n_out, P = sizes[0], int(net.n_out), int(net.n_params)
            lead = lead_shape(layer_leads(layers, B if T is None else (B, T))[-1])  # the output's (a layer may change it)
            if product in ("grad_norms", "grads"):
                self._target = xp.zeros(lead + (n_out,), dtype=dt)
                if self.loss == "softmax_cross_entropy":
                    self._loss = _Labels(xp, B)
            if product == "ggn_vp":
                self._v = xp.zeros(P, dtype=dt)
            O = n_out * int(np.prod(lead[1:], dtype=np.int64))  # per sample: every output position
            shape = {"grad_norms": (B, len(layers)) if self.per_layer else (B,), "grads": (B, P),
                     "ntk": (sizes[0], sizes[-1]) + (() if self.trace else (O, O)), "ggn_vp": (P,),
                     "ggn_diagonal": (P,)}[product]
            self._out = xp.zeros(shape, dtype=dt)
            self._graphs = self._graph_cache()

    def _input_buffer(self, B: int, in_shape: tuple):
        lead = lead_shape(B if self.tokens is None else (B, self.tokens))
        if self._ids is not None:
            return self._xp.zeros(lead, dtype=self._xp.int64)
        return self._xp.zeros(lead + in_shape, dtype=self.dtype)

    # ------------------------------------------------------------------ the call
    def __call__(self, x: Any, *rest: Any, copy: bool = False):
        """The product at the given inputs (module docstring's table), written into the step's
        buffer and returned; ``copy=True``: fresh arrays the step never touches again."""
        self._check_arity(len(rest))
        with self._exclusive():  # one call at a time, the copy-out included (``step_io``)
            self._check_net()
            self._load_input(self._x, x, "x1" if self._x2 is not None else "x")
            labels = False
            if self._target is not None:
                labels = self._load_target(rest[0])
            elif self._x2 is not None:
                self._load_input(self._x2, rest[0], "x2")
            elif self._v is not None:
                self._check_device(rest[0], "v")
                v = check_direction(rest[0], anchor(self._net.layers), self._v.size, self.dtype,
                                    "Gradients.flat (the network's parameters in layer order)")
                self._xp.copyto(self._v, v)
            self._run_or_replay(labels, self._run)
            return self._results(copy)

    def _check_arity(self, n: int) -> None:
        want = 1 if (self._target is not None or self._x2 is not None or self._v is not None) else 0
        if n != want:
            call = _CALLS.get(self.product) or ("step(x1, x2)" if self._x2 is not None else "step(x)")
            raise TypeError(f"a compiled {self.product!r} step is called as {call}: got {n + 1} inputs")

    def _load_input(self, buf, a, name: str) -> None:
        """``a`` into ``buf``: token ids as the first layer checks them, floats as ``forward`` takes them."""
        help = f"{name} must be {shape_str(buf.shape)}" + (" integer token ids" if self._ids is not None else "")
        if self._ids is not None:
            a = self._ids(a, 0)
        self._check_device(a, name)
        if self._ids is None:
            a = network_input(a, name, self._xp, self.dtype)
        if a.shape != buf.shape:
            raise ValueError(f"this {self.product!r} step was compiled for a batch of {shape_str(buf.shape)}: "
                             f"{help}, got {shape_str(a.shape)}")
        self._xp.copyto(buf, a, casting="same_kind")

    def _run(self, labels: bool = False) -> None:
        """The eager product on the static buffers, into ``self._out`` (what a graph records)."""
        with ids_checked():  # labels and token ids were checked at load, on the host: no read while recording
            self._product(self._loss.labels if labels else self._target)

    def _product(self, target) -> None:
        net, x, p, out = self._net, self._x, self.product, self._out
        if p == "grad_norms":
            net.per_sample_grad_norms(x, target, loss=self.loss, per_layer=self.per_layer, method=self.method, out=out)
        elif p == "grads":
            net.per_sample_grads(x, target, loss=self.loss, out=out)
        elif p == "ntk":
            _ntk.ntk(net, x, self._x2, trace=self.trace, out=out, **self._kw)
        elif p == "ggn_vp":
            net.ggn_vp(x, self._v, loss=self.loss, out=out)
        else:
            net.ggn_diagonal(x, loss=self.loss, out=out, **self._kw)

    def _results(self, copy: bool):
        out = self._out.copy() if copy else self._out
        if self.product in ("grads", "ggn_diagonal"):
            return Gradients(layers=named_views(self._net.layers, out), flat=out)
        return out

    def _shape_help(self, what: str) -> str:
        if what == "target":
            return super()._shape_help(what)
        return f"x must be {shape_str(self._x.shape)}"

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        """Bytes of the step's buffers (inputs and result; the parameters are the network's)."""
        bufs = (self._x, self._x2, self._target, self._v, self._out, getattr(self._loss, "labels", None))
        return int(sum(a.nbytes for a in bufs if a is not None))

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.captured else "buffers"
        return (f"ProductStep({self._net!r}, product={self.product!r}, batch={self.batch}, loss={self.loss!r}, "
                f"{mode}, {self.nbytes} bytes)")


def compile_step(net, batch: Any, product: Any, loss: str, capture: Any, tokens: Any, training: dict, options: dict):
    """What ``net.compile`` returns: the training step (``product="step"``; ``training`` its keyword
    arguments) or a ``ProductStep`` (``options``: ``per_layer``, ``method``, ``trace``, ``max_memory``),
    each refusing the other's arguments by name."""
    from .compiled import TrainingStep

    product = canonical_product(product)
    if product == "step":
        if options:
            raise TypeError(f"{', '.join(sorted(options))}: options of a compiled product (product='grad_norms', "
                            f"'ntk', ...), not of the training step")
        return TrainingStep(net, batch, loss=loss, capture=capture, tokens=tokens, **training)
    given = [k for k, v in training.items() if k != "input_grad" and v not in (None, 0, 0.0)]
    if given:
        raise TypeError(f"{', '.join(given)}: arguments of the (private) training step, not of product={product!r}")
    known = tuple(o for o in _OPTIONS[product] if o != "loss")
    bad = sorted(set(options) - set(known))
    if bad:
        raise TypeError(f"product={product!r} takes {', '.join(known) or 'no options'}, not {', '.join(bad)}")
    return ProductStep(net, batch, product, loss=loss, capture=capture, tokens=tokens, **options)
