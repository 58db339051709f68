"""The layouts of a network file, read off the names it declares before any data is read:
Sequential's (a ``spec`` and ``"<j>.<name>"`` parameters), jacgrad's dense layout (``W0, b0, …``
and ``activations``) and a torch ``nn.Sequential`` state dict (``0.weight``, ``0.bias``, …). Each
becomes one layer list (``spec``) and a map from canonical parameter names (``"<j>.W"``,
``"<j>.<i>.gamma"``) to the file's keys; a key that no layer claims, or a second spelling of a
number (``W01`` beside ``W1``, ``00.weight``), is an error naming it. See ``jacgrad.io.netfile``.
"""

from __future__ import annotations

import json
import re

from .file_safety import NetworkFileError as Bad
from .file_safety import NetworkFileKeyError, quote
from ..nn import layers as _layers  # noqa: F401  (registers the built-in kinds)
from ..protocol.layer import layer_class, layer_kinds, stored_names
from .state_keys import strip_prefix

__all__ = ["dense_layers", "inner_specs", "plan"]

_N = r"(?:0|[1-9]\d*)"  # one spelling per number: W1 and W01 never both name layer 1
_JACGRAD_KEY = re.compile(rf"^([Wb])({_N})$")
_TORCH_KEY = re.compile(rf"^({_N}(?:\.{_N})*)\.(weight|bias)$")

class _ByKind(dict):
    """``{kind: getattr(layer_class(kind), attr)}`` read from the registry at each lookup, so a kind
    registered later (``layer_protocol.register_layer``) is a known kind of files too."""

    def __init__(self, attr: str):
        super().__init__()
        self._attr = attr

    def _table(self):
        return {k: getattr(layer_class(k), self._attr, {}) for k in layer_kinds()}

    def __getitem__(self, kind):
        return self._table()[kind]

    def __contains__(self, kind):
        return kind in layer_kinds()

    def __iter__(self):
        return iter(layer_kinds())

    def __len__(self):
        return len(layer_kinds())


PARAMS = _ByKind("names")  # a layer's parameter names, by kind
_FIELDS = _ByKind("spec_fields")  # a layer's spec fields and their JSON types, by kind
_OPTIONAL = _ByKind("spec_optional")  # fields a spec may leave out (its layer's default), by kind
MAX_DEPTH = 32


def inner_specs(s: dict) -> list:
    """A container's inner layer specs in parameter order (its ``layers``, then its ``shortcut``'s):
    the inner layers are numbered in this order in the file's keys (``2.3.weight``)."""
    return list(s["layers"]) + list(s.get("shortcut") or [])
def plan(c, suffix):
    """``(spec, sources, names, missing)``: the layer list (a dense layer whose bias the file leaves
    out has ``"bias": False``), canonical key -> ``(file key, transposed)``, the file's own activation names (None: it has none)
    and what to say when it has none. Every name in the file is checked here, before any data is
    read: a name that no layer claims is an error naming it."""
    if "spec" in c.text:
        return _sequential_plan(c)
    if suffix == ".npz" or c.text.get("format") == "jacgrad" or any(_JACGRAD_KEY.match(k) for k in c.arrays):
        return _jacgrad_plan(c, suffix)
    return _torch_plan(c)


def _sequential_plan(c):
    spec = _json(c.text["spec"], "its 'spec'", "a JSON list of layers")
    _check_spec(spec, "", 0)
    ties = _ties(c)
    sources = {}
    for key, kind in _param_keys(spec, ""):
        if key in ties:  # a shared parameter's later use: stored once, under its first use's key
            if key in c.arrays:
                raise Bad(f"layer {key.rsplit('.', 1)[0]} ({kind}): array {quote(key)} is both stored and tied to "
                          f"{quote(ties[key][0])} in its 'ties'")
            sources[key] = ties[key]
            continue
        if key not in c.arrays:
            raise Bad(f"layer {key.rsplit('.', 1)[0]} ({kind}): array {quote(key)} is missing")
        sources[key] = (key, False)
    _no_others(c.arrays, sources, "is not a parameter of any layer in its 'spec'")
    for key, (src, _) in ties.items():
        if key not in sources or src not in sources or sources[src] != (src, False):
            what = "is not a parameter of any layer in its 'spec'" if key not in sources else \
                f"names {quote(src)}, which is not a stored parameter of a layer in its 'spec'"
            raise Bad(f"'ties': {quote(key)} {what}")
    names = [s["activation"] for s in dense_layers(spec)]
    return spec, sources, names, None


def _jacgrad_plan(c, suffix):
    n = 0
    while f"W{n}" in c.arrays:
        n += 1
    if n == 0:
        raise Bad(f"has no array W0 (found: {', '.join(quote(k) for k in sorted(c.arrays)[:8]) or 'nothing'})")
    for k in sorted(c.arrays):
        if not _JACGRAD_KEY.match(k):
            raise Bad(f"key {quote(k)} is not part of jacgrad's layout (W0, b0, W1, b1, ..., numbers without "
                      f"leading zeros{', and activations' if suffix == '.npz' else ''})")
    extra = sorted(k for k in c.arrays if int(k[1:]) >= n)
    if extra:
        raise Bad(f"{', '.join(extra[:8])} present but W{n} is missing")
    sources, spec = {}, []
    for j in range(n):
        sources[f"{j}.W"] = (f"W{j}", False)
        if f"b{j}" in c.arrays:
            sources[f"{j}.b"] = (f"b{j}", False)
        spec.append(_dense(f"b{j}" in c.arrays))
    names = c.text.get("activations")
    if suffix == ".safetensors" and names is not None:
        names = _json(names, "metadata 'activations'", "a JSON list of names")
        if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
            raise Bad("metadata 'activations' is not a JSON list of names")
    missing = ("has no 'activations' array (one name per layer); add one, or pass activations=" if suffix == ".npz"
               else "has no activations in its metadata; pass activations=")
    return spec, sources, names, missing


def _torch_plan(c):
    layers: dict[tuple, dict] = {}
    # a trainer's prefix on every key (Lightning's 'model.0.weight'): read past it
    prefix = strip_prefix(c.arrays, lambda keys: all(_TORCH_KEY.match(k) for k in keys)) or ""
    for k in c.arrays:
        m = _TORCH_KEY.match(k[len(prefix):])
        if m is None:
            raise Bad(f"key {quote(k)} is not the weight or bias of a Linear at a numeric module path "
                      f"(like '0.weight', '2.bias', numbers without leading zeros): jacgrad reads nn.Sequential "
                      f"state dicts of Linears; for a model's named keys ('fc1.weight') pass the torch module: "
                      f"jg.load(path, model=module)")
        layers.setdefault(tuple(int(p) for p in m.group(1).split(".")), {})[m.group(2)] = k
    if not layers:
        raise Bad("holds no tensors")
    sources, spec = {}, []
    for j, index in enumerate(sorted(layers)):
        keys = layers[index]
        if "weight" not in keys:
            raise Bad(f"key {quote(keys['bias'])} has no matching {quote(keys['bias'][:-4] + 'weight')}")
        shape = c.arrays[keys["weight"]][0]
        if len(shape) != 2:
            raise Bad(f"key {quote(keys['weight'])} has shape {shape}, not a Linear's (out, in)")
        sources[f"{j}.W"] = (keys["weight"], True)
        if "bias" in keys:
            sources[f"{j}.b"] = (keys["bias"], False)
        spec.append(_dense("bias" in keys))
    return spec, sources, None, "is a torch state dict, which carries no activations; pass activations= (one per Linear)"


def _dense(bias: bool) -> dict:
    """A dense layer's spec, its activation still to be set: a layer whose bias the file leaves out
    is bias-free (``Dense(W, bias=False)``, torch's ``Linear(bias=False)``), never a zero bias that
    would be a parameter the source does not have."""
    return {"kind": "dense", "activation": None} if bias else {"kind": "dense", "activation": None, "bias": False}


def _ties(c) -> dict:
    """The file's ``ties`` (Sequential's layout, ``jacgrad.io.netfile``): ``{later use's key: (first
    use's key, transposed)}``, checked as JSON of that form; ``{}`` when it has none."""
    if "ties" not in c.text:
        return {}
    ties = _json(c.text["ties"], "its 'ties'", "a JSON object of shared parameters")
    ok = isinstance(ties, dict) and all(isinstance(k, str) and isinstance(v, list) and len(v) == 2
                                        and isinstance(v[0], str) and isinstance(v[1], bool) for k, v in ties.items())
    if not ok:
        raise Bad(f"its 'ties' is not a JSON object {{key: [key of the first use, transposed]}}: {quote(c.text['ties'])}")
    return {k: (v[0], v[1]) for k, v in ties.items()}


def _no_others(arrays, sources, why):
    claimed = {src[0] for src in sources.values()}
    other = sorted(k for k in arrays if k not in claimed)
    if other:
        raise Bad(f"key {quote(other[0])} {why}")


def _json(text, what, want):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise Bad(f"{what} is not {want} ({type(exc).__name__}): {quote(text)}") from None


def _check_spec(spec, prefix, depth):
    """A layer list of known kinds, each with exactly its fields of the right types."""
    if depth > MAX_DEPTH:
        raise Bad(f"layer {prefix[:-1]}: residual blocks nested more than {MAX_DEPTH} deep")
    if not isinstance(spec, list) or not spec:
        raise Bad(f"{'the spec' if not prefix else f'layer {prefix[:-1]}'}: the layer list is not a non-empty JSON list")
    for j, s in enumerate(spec):
        where = f"layer {prefix}{j}"
        kind = s.get("kind") if isinstance(s, dict) else None
        if not isinstance(kind, str) or kind not in _FIELDS:
            text = quote(kind) if isinstance(s, dict) else f"{type(s).__name__} {quote(json.dumps(s))}"
            raise NetworkFileKeyError(f"{where}: unknown layer kind {text}; valid: {', '.join(_FIELDS)}")
        fields, optional = _FIELDS[kind], _OPTIONAL[kind]  # optional: fields older files lack (a Dense's "bias", a block's "shortcut")
        if not {"kind", *fields} <= set(s) <= {"kind", *fields, *optional}:
            extra = f" (and optionally {', '.join(optional)})" if optional else ""
            raise Bad(f"{where} ({kind}): fields {', '.join(quote(k) for k in sorted(s)[:8])}; a {kind} layer has "
                      f"{', '.join(['kind', *fields])}{extra}")
        for name, types in {**fields, **{k: t for k, t in optional.items() if k in s}}.items():
            bool_ok = types is bool or (isinstance(types, tuple) and bool in types)
            if not isinstance(s[name], types) or (isinstance(s[name], bool) and not bool_ok):
                raise Bad(f"{where} ({kind}): {name} is {quote(json.dumps(s[name]))}, not a {name} value")
        if "layers" in fields:  # a container: its inner layer lists
            _check_spec(s["layers"], f"{prefix}{j}.", depth + 1)
            if "shortcut" in s:
                _check_spec(s["shortcut"], f"{prefix}{j}.", depth + 1)


def _param_keys(spec, prefix):
    for j, s in enumerate(spec):
        if "layers" in s:
            yield from _param_keys(inner_specs(s), f"{prefix}{j}.")
        else:
            names = stored_names(layer_class(s["kind"]), s)
            yield from ((f"{prefix}{j}.{name}", s["kind"]) for name in names)


def dense_layers(spec):
    for s in spec:
        if "layers" in s:
            yield from dense_layers(inner_specs(s))
        elif s["kind"] == "dense":
            yield s
