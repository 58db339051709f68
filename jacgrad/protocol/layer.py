"""The layer protocol: what a layer of a ``jacgrad.Sequential`` implements, and the registry of
layer kinds that file loading builds layers through.

A layer is one module that implements ``Layer`` below and one registry entry
(``register_layer(kind, cls)``); nothing else in the package names it. The network's passes,
the buffer carving (``_block_passes``), the parameter-space products (``per_sample``, ``ntk``,
``curvature``, ``private``) and file loading (``netfile``) read layers only through this
protocol, and the products read a layer's parameters only through its leaves
(``jacgrad.protocol.leaves``: ``(a, δ)`` pairs with a token axis).

Shapes, with letters: ``B`` the batch, ``T`` tokens (positions, patches), per-sample shapes
without ``B``. A layer declares its per-sample ``in_shape``/``out_shape`` (``(n_in,)`` and
``(n_out,)`` for a layer acting per token, whatever ``T``). Methods that name buffer shapes take
``B`` as the leading shape of the batch: an int, or a tuple ``(B, T)`` for a token batch.

    >>> import jacgrad as jg
    >>> layer_class("dense") is jg.layers.Dense, "rmsnorm" in layer_kinds()
    (True, True)
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, Sequence, runtime_checkable

__all__ = ["Layer", "anchor", "bind_shapes", "buffers", "chained", "layer_leads", "layout_changed", "layout_generation", "stored_arrays", "stored_names", "layer_class", "layer_kinds", "lead_shape", "leaf_layers", "named_params",
           "register_layer"]


@runtime_checkable
class Layer(Protocol):
    """What a layer implements (``Dense``, ``LayerNorm``, ``RMSNorm``, ``Residual`` do; a new layer
    does the same and calls ``register_layer``).

    Class attributes
        ``kind``: the name in files (``spec()["kind"]``) and in the registry.
        ``names``: the names of its parameter arrays, in ``params`` order (``("W", "b")``; an
        instance property where they depend on the layer: a bias-free ``Dense`` has ``("W",)``).
        ``spec_fields``: ``{field: JSON type(s)}`` of ``spec()`` besides ``"kind"`` — what a file
        must hold for this layer (checked before any array is read). Optional: ``spec_optional``,
        fields a spec may leave out (written only where they differ from the default, so files
        from before them load: a Dense's ``"bias": false``).

    Shapes
        ``in_shape``, ``out_shape``: per-sample shapes, without B (``(n_in,)``, ``(n_out,)``);
        ``n_in``/``n_out``: their last entries (the feature widths that consecutive layers match).

    Passes (into the caller's buffers)
        ``forward_shapes(B) -> [shape]``: the buffers ``forward`` writes, its output first.
        ``backward_shapes(B, input_grad) -> [shape]``: the buffers ``backward`` writes, ``∂L/∂input``
        last when ``input_grad``.
        ``forward(z, check=None, where=0, out=None) -> (y, state)``: ``z: (B, *in_shape)`` or, for
        a per-token layer, ``(B, T, n_in)``; ``state`` the least its backward, factor and leaves need.
        ``backward(state, g, grads, input_grad=True, check=None, where=0, sq=None, out=None)
        -> (∂L/∂z or None, δ)``: ``g`` only read; parameter gradients written into ``grads`` (views
        in ``params`` shapes); ``sq: (B,)`` gets each sample's squared gradient norm added.
        Optional: ``output_lead(B) -> B_out``, the leading shape of its output for an input's ``B``,
        where the layer changes the token axis (image -> tokens ``B -> (B, T)``, a class token
        ``(B, T) -> (B, T + 1)``, a read-out ``(B, T) -> B``; ``nn.stack.layer_leads``): each layer's
        buffer shapes take its own input's lead.
        ``factor(state)``: the per-sample Jacobian as a structured factor for ``Chain``. A factor
        of a layer with parameters also splits at them, which is all the products need of it:
        ``param_vjp_stack(A, need_input) -> ([G per leaf], A_in or None)`` for output cotangent
        rows ``A: (B, R, *out)`` (``G: (B, R, [T,] d)`` at each leaf's output point), and
        ``param_jvp(t, leaf_tangent)``: the output tangent of an input tangent ``t`` (None: 0)
        with ``leaf_tangent(i, base)`` (leaf i's parameter tangent plus ``base``, the tangent
        arriving at its output point) added where leaf i acts (``jacobian.LayerJacobian``,
        ``factors.NormFactor``); ``n_leaves`` when it has more than one leaf.

    Parameters
        ``params``: the parameter arrays (by reference), in ``names`` order.
        ``param_leaves() -> [leaf]``: its leaves (``jacgrad.protocol.leaves``), each owning
        consecutive arrays of ``params``; ``[]`` for a layer without parameters.
        ``param_input(state) -> a``: the ``a`` its leaf pairs with ``δ``, ``(B, p)`` or with a token
        axis ``(B, T, p)`` (the layer input of a Dense, ``x̂`` of a norm, patches of a convolution).

    Files, torch, report
        ``spec() -> dict``: ``{"kind": kind, **fields}``, JSON-able; ``from_spec(spec, params,
        inner)`` (a classmethod) builds the layer back: ``params`` the arrays by name (a Dense
        bias may be None), ``inner`` the built inner layers of a container (``Residual``) else None.
        ``file_widths(where, shapes) -> (n_in, n_out)`` (a classmethod): the widths of a file's
        declared parameter shapes (``{name: (shape, file key)}``), a ``ValueError`` naming the
        key when they cannot be this layer's; ``(None, None)`` for a layer whose widths do not chain
        (an image layer: the next layer's widths are then not checked against it).
        Optional: ``file_names(spec)`` (a classmethod), the arrays a file of ``spec`` stores for this
        layer, by name (default ``names``: a conv without bias stores no ``bias``, a BatchNorm also its
        running statistics), and ``file_arrays()``, ``[(name, array)]`` of those (default: ``names``
        with ``params``) — ``stored_names``/``stored_arrays`` below.
        The torch mapping (``interop.torch_blocks``) and the report row (``block_flow``) are
        entries of their own modules keyed by ``kind``.

    Lean caches (optional; the shared passes in ``nn.stack`` and ``network.cache`` read only these)
        ``output_recomputable``: True when the layer can recompute its output from its state (a
        Dense whose φ' needs ``h`` keeps ``h``): then ``recompute_output(state, with_factor=True) ->
        (z, factor)`` gives the output and, made in the same pass, its ``factor(state)`` (None
        without ``with_factor``), which its ``backward`` takes as ``factor=``; its ``forward_shapes(B, keep_derivative=True)`` adds a buffer for the
        derivative, and its row forward takes ``keep_derivative=True`` (a compiled step, a token
        batch: nothing is recomputed there, the derivative is kept instead).
        ``input_in_state``: True when ``state[0]`` is the layer's input and ``backward`` takes it
        recomputed: a forward cache then keeps ``None`` there when the layer before is
        ``output_recomputable`` (one array per Dense layer in a dense stack's cache).
        ``scales_in_place``: True when ``backward`` scales its cotangent into its first backward
        buffer (δ): the layer after it may write ``∂L/∂input`` straight into that buffer.
        ``reusable_factor``: True when ``factor(state)`` reads the state's arrays by reference (a
        Dense's ``diag(d)·Wᵀ``): a compiled step, whose states are the same buffers every call, makes
        it once and hands it to ``backward`` as ``factor=``.
        ``kept(state) -> (array, is_output)``: the one array the state keeps for the factor (a
        Dense's ``y`` or ``h``: ``SequentialCache.saved``/``from_output``).
        ``bound()``: ``((what, object), ...)`` that a forward pass reads and a later backward must
        find the same (by identity: the arrays and activation a Dense had), else ``()``.
        ``passes_for(lead) -> (forward, backward)``: the callables to run on inputs of leading
        shape ``lead`` (``nn.stack.Plan``; a per-token layer's row passes on ``(B, n)``), same
        signatures and results as ``forward``/``backward``; default those two. A network works
        these out once per lead (with its buffer layouts): whoever changes a layer in place so
        that its buffer shapes may change (``MLP``'s activations list) calls ``layout_changed()``.

    Containers
        A layer holding inner layers (``Residual``) exposes them as ``layers``; its leaves are its
        inner layers' leaves in order, and its factor exposes ``inner`` (a ``Chain``) and ``scale``,
        and ``shortcut``: None (the identity: ``I + s·J_inner``) or the ``Chain`` of a projection
        shortcut (``J_p + s·J_inner``), whose layers follow the branch's in ``layers``.
    """

    kind: ClassVar[str]
    names: ClassVar[tuple]
    spec_fields: ClassVar[dict]

    @property
    def in_shape(self) -> tuple: ...

    @property
    def out_shape(self) -> tuple: ...

    @property
    def params(self) -> list: ...

    def forward_shapes(self, B: Any) -> list: ...

    def backward_shapes(self, B: Any, input_grad: bool = True) -> list: ...

    def forward(self, z, check=None, where: Any = 0, out=None): ...

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None): ...

    def factor(self, state): ...

    def param_leaves(self) -> list: ...

    def spec(self) -> dict: ...


_REGISTRY: dict[str, type] = {}


def register_layer(kind: str, cls: type) -> type:
    """Register ``cls`` as the layer of ``kind`` (its ``spec()["kind"]``): file loading builds it
    through ``cls.from_spec``. Returns ``cls``. Registering a kind twice with another class is a
    ``ValueError`` naming both (the same module and class name again, as a rerun script defines it,
    replaces it); ``cls`` must have ``kind == kind`` and the protocol's class
    attributes and ``from_spec``/``file_widths``."""
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"register_layer: kind must be a non-empty string, got {kind!r}")
    if getattr(cls, "kind", None) != kind:
        raise ValueError(f"register_layer: {getattr(cls, '__name__', cls)!r} has kind "
                         f"{getattr(cls, 'kind', None)!r}, not {kind!r}")
    missing = [a for a in ("names", "spec_fields", "from_spec", "file_widths", "forward", "backward", "factor",
                           "forward_shapes", "backward_shapes", "param_leaves", "spec") if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"register_layer: {cls.__name__} does not implement the layer protocol: "
                        f"missing {', '.join(missing)} (jacgrad.protocol.layer.Layer)")
    old = _REGISTRY.get(kind)
    same_name = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not same_name:  # (the same class defined again: a rerun script)
        raise ValueError(f"register_layer: kind {kind!r} is already {old.__module__}.{old.__name__}; "
                         f"cannot register {cls.__module__}.{cls.__name__} under it")
    _REGISTRY[kind] = cls
    return cls


def layer_class(kind: str) -> type:
    """The registered class of ``kind``; a ``KeyError`` listing the registered kinds otherwise."""
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise KeyError(f"unknown layer kind {kind!r}; registered: {', '.join(_REGISTRY)}") from None


def layer_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_REGISTRY)


_LAYOUT_GENERATION = [0]


def layout_changed() -> None:
    """Drop every network's worked-out plans (``nn.stack.Plan``: buffer layouts, passes): a layer
    was changed in place (an ``MLP``'s ``activations[j] = name``, ``weights[j] = W``)."""
    _LAYOUT_GENERATION[0] += 1


def layout_generation() -> int:
    """How many times ``layout_changed`` was called: a plan made at another generation is stale."""
    return _LAYOUT_GENERATION[0]


def lead_shape(B: Any) -> tuple:
    """``B`` of ``forward_shapes(B)`` as a tuple of leading dimensions: ``5 -> (5,)``, ``(5, 7) -> (5, 7)``."""
    return tuple(int(b) for b in B) if isinstance(B, (tuple, list)) else (int(B),)


def layer_leads(layers: Sequence[Any], B: Any) -> list:
    """The leading shape of every layer's input, and last of the network's output: ``B`` (an int,
    or ``(B, T)`` for a token batch) handed on through each layer's ``output_lead`` where it has
    one (a layer that changes the token axis: image -> tokens ``B -> (B, T)``, a class token
    ``(B, T) -> (B, T + 1)``, a token read-out ``(B, T) -> B``, ``TransposeTokens`` ``(B, T) -> (B, d)``),
    else unchanged."""
    leads = [B]
    for L in layers:
        f = getattr(L, "output_lead", None)
        leads.append(B if f is None else f(B))
        B = leads[-1]
    return leads


def buffers(out, shapes: list, like) -> list:
    """``out`` (the caller's buffers, one per shape), or fresh ones on ``like``'s device and dtype."""
    if out is not None:
        return out
    from ..core.backend import get_xp

    xp = get_xp(like)
    return [xp.empty(shape, dtype=like.dtype) for shape in shapes]


def leaf_layers(layers: Sequence[Any], path: tuple = ()):
    """``(path, layer)`` for every layer that is not a container, containers (``layers``, e.g. a
    residual block) opened, in parameter order; ``path``: the indices from the top, ``(1, 0)``
    for inner layer 0 of layer 1."""
    for j, L in enumerate(layers):
        inner = getattr(L, "layers", None)
        if inner is not None:
            yield from leaf_layers(inner, path + (j,))
        else:
            yield path + (j,), L


def named_params(layers: Sequence[Any], prefix: str = "layer ") -> list:
    """``[(where, array)]`` for every parameter, in ``leaf_layers`` order, ``where`` like
    ``"layer 2 (LayerNorm) gamma"`` or ``"layer 1.0 (Dense) W"`` inside a residual block: the names
    the compiled steps' messages give."""
    return [(f"{prefix}{'.'.join(map(str, path))} ({type(L).__name__}) {name}", p)
            for path, L in leaf_layers(layers) for name, p in zip(L.names, L.params)]


def anchor(layers: Sequence[Any]):
    """The first parameter array of ``layers`` (containers opened; a layer without parameters,
    an ``Activation``, skipped): what a network's dtype and device are read from; a ``ValueError``
    when no layer has one."""
    found = _first_param(layers)  # every pass reads it (dtype, device): no generator, no paths
    if found is not None:
        return found
    raise ValueError("a network needs at least one layer with parameters; these have none: "
                     f"{', '.join(map(repr, layers))}")


def _first_param(layers: Sequence[Any]):
    for L in layers:
        inner = getattr(L, "layers", None)
        if inner is not None:
            found = _first_param(inner)
            if found is not None:
                return found
        elif L.params:
            return L.params[0]
    return None


def chained(layers: Sequence[Any], owner: str, label: str) -> list:
    """``layers`` as a list, checked: at least one, each of a registered layer class, consecutive
    widths agreeing; errors read ``f"{owner}{label} {j} ..."``."""
    layers = list(layers)
    if not layers:
        raise ValueError(f"{owner}needs at least one {label}")
    classes = tuple(_REGISTRY.values())
    for j, L in enumerate(layers):
        if not isinstance(L, classes):
            raise TypeError(f"{owner}{label} {j} is a {type(L).__name__}, not one of "
                            f"{', '.join(t.__name__ for t in classes)} (jacgrad.nn.layers; "
                            f"jacgrad.protocol.layer.register_layer adds a kind)")
        if L.n_in is None and hasattr(L, "with_width"):  # a width-preserving layer made without one (Activation)
            if not j:
                raise ValueError(f"{owner}{label} 0 ({L!r}) has no width: give it one, e.g. Activation('relu', n)")
            layers[j] = L = L.with_width(layers[j - 1].n_out)
        if j and None not in (L.n_in, layers[j - 1].n_out) and L.n_in != layers[j - 1].n_out:
            raise ValueError(f"{owner}{label} {j} ({L!r}) takes {L.n_in} features but {label} {j - 1} "
                             f"({layers[j - 1]!r}) outputs {layers[j - 1].n_out}")
    return layers


def stored_names(cls: type, spec: dict) -> tuple:
    """The arrays a network file stores for a layer of class ``cls`` and ``spec``: its
    ``file_names(spec)`` where it has one, else its ``names``."""
    f = getattr(cls, "file_names", None)
    return tuple(f(spec)) if f is not None else tuple(cls.names)


def stored_arrays(layer) -> list:
    """``[(name, array)]`` a network file stores for ``layer``: its ``file_arrays()`` where it has
    one, else its ``names`` with its ``params``."""
    f = getattr(layer, "file_arrays", None)
    return list(f()) if f is not None else list(zip(layer.names, layer.params))


def bind_shapes(layers: Sequence[Any], in_shape: Any = None, owner: str = "Sequential") -> None:
    """Give every image layer (one with ``bind_in_shape``: convolutions, pools, BatchNorm, Flatten)
    its per-sample input shape, walking from ``in_shape`` (None: the first layer's own) through each
    layer's ``out_shape``. A ``ValueError`` names the first layer left without one."""
    shape = None if in_shape is None else tuple(int(s) for s in in_shape)
    if shape is None and layers:
        shape = getattr(layers[0], "in_shape", None)
    for j, L in enumerate(layers):
        if hasattr(L, "bind_in_shape"):
            if shape is None:
                raise ValueError(f"{owner}: layer {j} ({L!r}) needs the per-sample input shape: pass in_shape=(C, H, W) "
                                 f"(Conv1d: (C, L)), or build the first layer with in_shape=")
            try:
                shape = L.bind_in_shape(shape)
            except ValueError as exc:
                raise ValueError(f"{owner}: layer {j}: {exc}") from None
        else:
            if (shape is not None and len(shape) > 1 and getattr(L, "n_in", 0) is None and hasattr(L, "with_in_shape")
                    and isinstance(layers, list)):  # a shape-preserving layer made without one (Activation) on images
                layers[j] = L = L.with_in_shape(shape)
            out = getattr(L, "out_shape", None)
            shape = None if out is None else tuple(out)
