"""What every ``jacgrad`` command shares: the one-line ``UsageError``, option converters, and the
checks of sizes, activations, inits, output paths, devices and ``--weights`` files.

``cli`` (the parser and ``main``), ``_cli_report``, ``_cli_check`` and ``bench`` import from here;
nothing here imports them, so the command's modules form no import cycle.

    >>> parse_sizes("4,8x2,3")
    [4, 8, 8, 3]
    >>> parse_activations("relu,leaky_relu(negative_slope=0.2)")
    ['relu', 'leaky_relu(negative_slope=0.2)']
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from .words import cli_words  # load_weights speaks the command line's words; still importable from here

__all__ = [
    "MAX_LAYERS", "PROG", "UsageError", "check_init", "check_network_fits", "check_scheduler_address", "hidden_activations", "check_output_path", "cli_words", "expand_repeats",
    "float_option", "int_at_least", "output_activation",
    "NORMS", "block_net", "load_weights", "parse_activations", "parse_sizes", "random_net", "resolve_device",
]

NORMS = ("layernorm", "rmsnorm")
MAX_LAYERS = 100_000  # --sizes/--depth beyond this is a typo, not a network

PROG = "jacgrad"


class UsageError(Exception):
    """A bad command line or input: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- option converters
def int_at_least(name: str, minimum: int):
    """An argparse ``type=``: an integer ≥ ``minimum``, else a message naming ``name``."""

    def convert(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be at least {minimum}, got {v}")
        return v

    return convert


def float_option(name: str, minimum=None, strict=False):
    """An argparse ``type=``: a finite float (``> minimum`` when ``strict``, else ``≥``)."""

    def convert(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a number") from None
        if not math.isfinite(v) or (minimum is not None and (v <= minimum if strict else v < minimum)):
            bound = "" if minimum is None else f" {'>' if strict else '≥'} {minimum:g}"
            raise argparse.ArgumentTypeError(f"{name} must be a finite number{bound}, got {text}")
        return v

    return convert


# ---------------------------------------------------------------------------- values
def parse_sizes(spec: str) -> list[int]:
    """``"784,256x20,10"`` → ``[784] + [256] * 20 + [10]``: widths separated by commas, where
    ``WIDTHxCOUNT`` repeats a width."""
    sizes: list[int] = []
    for token in spec.split(","):
        token = token.strip()
        width, sep, count = token.lower().partition("x")
        try:
            w = int(width)
            c = int(count) if sep else 1
        except ValueError:
            raise UsageError(
                f"--sizes {spec!r}: {token!r} is not a width (an integer) or WIDTHxCOUNT such as 256x20"
            ) from None
        if w < 1 or c < 1:
            raise UsageError(f"--sizes {spec!r}: {token!r} must be a positive width (and count)")
        if len(sizes) + c > MAX_LAYERS + 1:
            raise UsageError(f"--sizes {spec!r}: more than {MAX_LAYERS:,} layers")
        sizes += [w] * c
    if len(sizes) < 2:
        raise UsageError(f"--sizes {spec!r}: needs at least two widths, the input and the output")
    return sizes


def check_network_fits(sizes: list[int], dtype: str, option: str) -> None:
    """A ``UsageError`` naming ``option`` when the weights and biases of a dense net of ``sizes``
    would not fit in the free RAM (``--sizes 99999999999999999999,2`` must not reach NumPy)."""
    from ..distributed.budget import free_ram

    params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))  # Python ints: no overflow
    need, have = params * np.dtype(dtype).itemsize, free_ram()
    if need > have:
        raise UsageError(f"{option}: the network's {params:,} parameters need {_gib(need)} of {dtype} "
                         f"but {_gib(have)} of RAM is free")


def _gib(n: int) -> str:
    return f"{n / 2**30:,.3g} GiB"


def check_scheduler_address(address: str) -> None:
    """A ``UsageError`` unless ``address`` reads as a Dask scheduler's ``[PROTOCOL://]HOST:PORT``
    (checked by ``distributed``'s own parser, before any connection is tried)."""
    hint = "give the scheduler's address, e.g. tcp://10.0.0.5:8786"
    try:
        from distributed.comm.addressing import parse_address, parse_host_port
    except ImportError:
        raise UsageError("--scheduler needs Dask's distributed package (pip install jacgrad[dask])") from None
    try:
        protocol, location = parse_address(address)
        if protocol in ("tcp", "tls", "ucx", "ws", "wss"):
            host, port = parse_host_port(location)
            if not host or not 0 < int(port) < 65536:
                raise ValueError(f"port {port} is out of range")
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--scheduler {address!r} is not a scheduler address ({exc}); {hint}") from None


def expand_repeats(text: str, option: str = "--activation") -> str:
    """``NAME*COUNT`` entries of a comma list written out: ``"relu*3,tanh"`` → ``"relu,relu,relu,tanh"``
    (commas and ``*`` inside a name's parentheses are its own)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    expanded = []
    for entry in out:
        name, star, count = entry.rpartition("*") if entry.rstrip().endswith(tuple("0123456789")) else ("", "", "")
        if not star or ")" in count:
            expanded.append(entry)
            continue
        try:
            n = int(count)
        except ValueError:
            raise UsageError(f"{option} {text!r}: {entry.strip()!r}: the count after '*' must be an integer") from None
        if not 1 <= n <= MAX_LAYERS:
            raise UsageError(f"{option} {text!r}: {entry.strip()!r}: the count after '*' must be 1 to {MAX_LAYERS:,}")
        expanded += [name] * n
    return ",".join(expanded)


def parse_activations(text: str, option: str = "--activation") -> list[str]:
    """The names in ``text`` (a comma list; ``NAME*COUNT`` repeats a name: ``tanh*9``,
    ``relu*3,tanh``), each checked against the activation table; a ``UsageError`` naming
    ``option``, the bad name and the valid ones otherwise."""
    from ..elementwise import activations

    if not text.strip():
        raise UsageError(f"{option} {text!r}: give activation names separated by commas (an empty name is not one)")
    try:
        return activations.split_names(expand_repeats(text, option))
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if "empty entry" in msg:
            raise UsageError(f"{option} {text!r}: give activation names separated by commas (an empty name is not one)") from None
        if "valid names" not in msg:
            msg += f"; valid names: {', '.join(activations.names())}"
        raise UsageError(f"{option}: {msg}") from None


def hidden_activations(spec: str, n_hidden: int, option: str = "--activation") -> list[str]:
    """One activation per hidden layer from ``spec``: one name for all, or a comma list of
    exactly ``n_hidden`` names (``relu,tanh,tanh``, ``relu*2,tanh``)."""
    names = parse_activations(spec, option)
    if len(names) == 1:
        return names * n_hidden
    if len(names) != n_hidden:
        raise UsageError(
            f"{option} {spec!r} gives {len(names)} activations but the network has {n_hidden} hidden "
            f"layer{'s' if n_hidden != 1 else ''}: give one name, or one per hidden layer "
            "(the output layer's is --output-activation; to compare networks, repeat --activation)"
        )
    return names


def output_activation(spec: str | None) -> str:
    """The ``--output-activation`` name (default identity): exactly one."""
    if spec is None:
        return "identity"
    names = parse_activations(spec, "--output-activation")
    if len(names) != 1:
        raise UsageError(f"--output-activation {spec!r}: give one name (the last layer's)")
    return names[0]


def random_net(sizes: list[int], hidden: list[str], output: str = "identity", **init_options):
    """``MLP.init(sizes, ...)`` with ``hidden[j]`` on hidden layer ``j`` (``hidden`` has
    ``len(sizes) - 2`` names, or one name when there is no hidden layer)."""
    from ..network.mlp import MLP

    return MLP.init(sizes, activation=list(hidden) if len(sizes) > 2 else hidden[0], output_activation=output,
                    **init_options)


def block_net(mlp, every: int, scale: float = 1.0, norm: str | None = None):
    """The ``Sequential`` of ``mlp``'s own dense layers (same weights) with a skip around every
    ``every`` consecutive hidden layers that map H -> H: ``Residual([norm, Dense × every], scale)``
    (pre-norm: a ``norm`` layer, γ = 1, β = 0, first inside each block when given). A run of
    fewer than ``every`` such layers left over, the layers that change width and the output
    layer stay plain."""
    from ..nn import layers as L
    from ..core.backend import get_xp
    from ..network.sequential import Sequential

    if norm is not None and norm not in NORMS:
        raise UsageError(f"--norm: unknown norm {norm!r}; valid names: {', '.join(NORMS)}")
    dense = [L.Dense(W, b, a) for W, b, a in zip(mlp.weights, mlp.biases, mlp.activations)]
    out, group = [], []

    def flush():
        out.extend(group)
        group.clear()

    for layer in dense[:-1]:
        if layer.n_in != layer.n_out:
            flush()
            out.append(layer)
            continue
        group.append(layer)
        if len(group) == every:
            H = layer.n_in
            ones = get_xp(layer.W).ones(H, dtype=layer.W.dtype)
            pre = [] if norm is None else [L.LayerNorm(ones) if norm == "layernorm" else L.RMSNorm(ones)]
            out.append(L.Residual(pre + group, scale=scale))
            group = []
    flush()
    return Sequential(out + [dense[-1]])


def check_init(name: str) -> str:
    from ..nn import initializers

    if name not in initializers.names():
        raise UsageError(f"--init: unknown init {name!r}; valid names: {', '.join(initializers.names())}")
    return name


def check_output_path(path: str, option: str) -> None:
    """Fail before any work when ``path`` obviously cannot be written (``-`` is stdout)."""
    if path == "-" and option == "--json":
        return
    if os.path.isdir(path):
        raise UsageError(f"{option} {path!r} is a directory, not a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{option} {path!r} is not writable")


def write_output(option: str, path: str, write) -> None:
    """``write(path)``, then "wrote PATH" on stderr; an ``OSError`` becomes the ``UsageError``
    "``option`` 'path': cannot write (reason)"."""
    try:
        write(path)
    except OSError as exc:
        raise UsageError(f"{option} {path!r}: cannot write ({exc.strerror or exc})") from None
    print(f"wrote {path}", file=sys.stderr)


def resolve_device(device: str, option: str = "--device") -> str:
    """``cpu``/``gpu``/``auto`` → ``cpu`` or ``gpu``; ``auto`` honours ``JACGRAD_BACKEND``."""
    from ..core import backend

    try:
        return backend.resolve_device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{option} {device}: {exc}") from None


# ---------------------------------------------------------------------------- --weights
def load_weights(path: str, dtype: str, device: str, activations: str | None = None, output: str | None = None):
    """The ``MLP`` in ``path`` (``.npz``, ``.safetensors``, ``.pt``/``.pth``: ``jacgrad.io.netfile``),
    ready to report on: every layer at least 1 wide and every weight and bias finite; anything
    else is a ``UsageError`` naming the file and the layer. For files that carry no activations:
    ``activations``, the ``--activation`` text for the hidden layers (one name, or one per hidden
    layer; one per layer, the output's last, is read as it always was), and ``output``, the
    ``--output-activation`` (default identity)."""
    from ..core.backend import to_numpy
    from ..network.mlp import MLP

    given = activations is not None or output is not None
    try:
        # the layer count first (a placeholder name per layer); then the names given for them
        net = MLP.load(path, dtype=dtype, device=device, activations="identity" if given else None)
    except FileNotFoundError:
        raise UsageError(f"--weights {path!r}: no such file") from None
    except (ValueError, KeyError, TypeError, OSError, FloatingPointError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(f"--weights {path!r}: {cli_words(msg)}") from None
    if given:
        L = len(net.weights)
        names = None if activations is None else parse_activations(activations)
        if names is not None and len(names) == L and output is None:
            pass  # one per layer, the output's last: the spelling from before --output-activation
        elif names is not None and L == 1:
            raise UsageError(f"--weights {path!r} has one layer, the output layer: give its activation with "
                             "--output-activation (--activation names the hidden layers)")
        else:
            hidden = ["identity"] * (L - 1) if activations is None else hidden_activations(activations, L - 1)
            names = hidden + [output_activation(output)]
        net = MLP(net.weights, net.biases, activations=names)
    for j, W in enumerate(net.weights):
        if 0 in W.shape:
            raise UsageError(f"--weights {path!r}: layer {j}: W{j} has shape {tuple(W.shape)}; every width must be at least 1")
    for j, (W, b) in enumerate(zip(net.weights, net.biases)):
        for name, a in ((f"W{j}", W), (f"b{j}", b)):
            bad = np.argwhere(~np.isfinite(to_numpy(a)))
            if len(bad):
                first = tuple(int(i) for i in bad[0])
                raise UsageError(f"--weights {path!r}: layer {j}: {name} has non-finite values (inf or NaN; first at index {first})")
    return net
