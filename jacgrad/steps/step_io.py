"""What every compiled training step shares, whatever network it runs: the checks of its
arguments, loading ``x`` and the target into the static buffers, and running the step eagerly
or as a captured CUDA graph with the ``capture="auto"`` fallback.

``StepIO`` is the base of ``compiled.TrainingStep`` (an ``MLP`` or a ``Sequential``); see
``jacgrad.steps.compiled`` for the contract. It reads the step's ``batch``, ``loss``, ``_xp``, ``_gpu``, ``_device``,
``_x``, ``_target``, ``_loss`` (a ``LossWorkspace``), ``_graphs``, ``_capture`` and
``capture_error``.

One call at a time: every step holds a lock of its own (``StepIO.__new__`` makes it) for the
whole of a call — loading the inputs, the run or replay, and the copy-out of ``copy=True`` — and
``rebind`` takes it too. Threads sharing a step therefore queue, and each gets the results of its
own inputs. On the GPU the lock orders the work as it is enqueued; since threads may enqueue on
different CUDA streams, each call also makes the caller's stream wait (on the device, never the
host) for the event recorded at the end of the previous call.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import numpy as np

from ..nn import losses
from ..cuda.graphs import CaptureError
from ..nn.loss_workspace import NAMES as LOSS_NAMES
from ..core.validation import float_array, network_input, shape_str
from ..core.backend import is_gpu_array, tf32_enabled
from ..nn.layers import named_params
from ..protocol.layer import layer_leads

__all__ = ["IdentityBinding", "StepIO", "check_batch_and_capture", "param_binding", "check_rebound", "check_step_args",
           "check_ties", "check_tokens_arg", "locked"]

_CAPTURE = ("auto", True, False)


def check_step_args(batch: Any, loss: str, capture: Any, gpu: bool) -> int:
    """``batch`` as an int, after checking the arguments every compiled training step takes."""
    if losses.canonical(loss) not in LOSS_NAMES:  # ValueError listing every loss for an unknown name
        raise ValueError(f"loss {loss!r} has no compiled form; compiled steps support {', '.join(LOSS_NAMES)}")
    return check_batch_and_capture(batch, capture, gpu)


def check_tokens_arg(tokens: Any, loss: str, lists_only: bool, layers: Any = None) -> int | None:
    """``tokens`` (T of a token batch ``(B, T, ·)``) as an int, or None for ``(B, ·)`` batches.
    softmax cross-entropy takes ``(B, C)`` logits, so a step whose output keeps the token axis
    (``(B, T, C)``: ``layers`` without a read-out such as ``TokenMean``) refuses it, as
    ``loss_and_grads`` does; a duck-typed net of lists has no per-token layers to run."""
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer (T, the positions of a (B, T, ·) batch), got {tokens!r}")
    if loss == "softmax_cross_entropy" and (layers is None or isinstance(layer_leads(layers, (1, int(tokens)))[-1], tuple)):
        raise ValueError("softmax_cross_entropy takes (B, C) logits, but a token step's output is (B, T, C): "
                         "compile the token step with loss='mse' or 'sigmoid_bce'")
    if lists_only:
        raise TypeError("tokens= compiles a Sequential (or an MLP), whose layers act per token; this net has "
                        "only weights/biases/activations lists")
    return int(tokens)


def check_batch_and_capture(batch: Any, capture: Any, gpu: bool) -> int:
    """``batch`` as an int, after checking it and ``capture`` (every compiled step takes both)."""
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not any(capture is c for c in _CAPTURE) and capture != "auto":
        raise ValueError(f"capture must be 'auto', True or False, got {capture!r}")
    if capture is True and not gpu:
        raise ValueError(
            "capture=True records a CUDA graph, which needs a network on the GPU (CuPy); this one is on "
            "the CPU (NumPy). Use capture='auto' (buffers only on the CPU) or capture=False, or net.to('gpu')"
        )
    return int(batch)


def check_rebound(where: str, new, old, gpu: bool, device) -> None:
    """``rebind``'s check of one parameter ``new`` (named ``where``) against the buffer ``old`` the
    step was compiled for: same shape, dtype, kind of device and GPU (``device``)."""
    if is_gpu_array(new) != gpu or new.shape != old.shape or new.dtype != old.dtype:
        raise ValueError(
            f"{where} is now {shape_str(new.shape)} {new.dtype} on the {'GPU' if is_gpu_array(new) else 'CPU'}; "
            f"this step was compiled for {shape_str(old.shape)} {old.dtype} on the {'GPU' if gpu else 'CPU'}: "
            f"compile a new step")
    if gpu and new.device.id != device.id:
        raise ValueError(f"{where} is now on GPU {new.device.id}; this step runs on GPU {device.id}")


def check_ties(old, new) -> None:
    """A ``ValueError`` naming the first use whose sharing differs between two ``protocol.sharing.Ties``
    of a step's parameters: the gradients' layout (P, which use sums into which parameter) is fixed
    when the step is compiled."""
    if new.uses == old.uses:
        return
    u = next(u for u, (a, b) in enumerate(zip(new.uses, old.uses)) if a != b)

    def how(ties):
        q, t = ties.uses[u]
        if q not in ties.multi:
            return "not shared"
        return "shared" if ties.where[q] == ties.use_names[u] else ties.where[q] + (" transposed" if t else "")
    raise ValueError(f"{new.use_names[u]} is now {how(new)}; this step was compiled with it {how(old)}: the "
                     f"parameter sharing a step sums is fixed: compile a new step")


def locked(method: Callable) -> Callable:
    """``method`` run under the step's lock (for ``rebind``: never while a call is in progress)."""

    @functools.wraps(method)
    def under_lock(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return under_lock


class StepIO:
    """The input side and the graph side of a compiled step (see the module docstring)."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self._lock = threading.RLock()  # one call at a time, rebind included (module docstring)
        self._done = None  # GPU: the event recorded on the caller's stream at the end of the last call
        return self

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the step for one call: the lock, and on the GPU the caller's stream ordered after the
        previous call's work (whatever stream that was enqueued on)."""
        with self._lock, self._on_device():
            if not self._gpu:
                yield
                return
            stream = self._xp.cuda.get_current_stream()
            if self._done is not None:
                stream.wait_event(self._done)
            try:
                yield
            finally:
                self._done = stream.record()

    def _check_net(self) -> None:
        """What every call checks first, under the lock: the network's origin (a ``copy=False``
        torch import whose parameters torch re-allocated raises; a duck-typed net has no origin),
        then the step's binding to the parameters (``_check_binding``)."""
        if hasattr(self._net, "_check_origin"):
            self._net._check_origin()
        self._check_binding()

    def _on_device(self):
        return self._device if self._gpu else contextlib.nullcontext()

    def _graph_cache(self):
        """A ``GraphCache`` when this step captures (GPU, capture "auto" or True), else None."""
        if self._gpu and self._capture in ("auto", True):
            from ..cuda.graphs import GraphCache

            return GraphCache()  # its capture stream lives on the current (the weights') device
        return None

    def _step(self, x, target, copy: bool):
        """One call of the step: check the binding, load ``x`` and the target, run (or replay)
        ``self._run(labels)``, return ``self._results(copy)``."""
        with self._exclusive():
            self._check_net()
            self._load(self._x, x, "x", self._shape_help("x"))
            labels = self._load_target(target)
            self._run_or_replay(labels, self._run)
            return self._results(copy)

    def _run_or_replay(self, labels: bool, run: Callable[[bool], None]) -> None:
        """``run(labels)`` eagerly, or the captured graph of this target kind; a failed capture
        under "auto" drops the graphs for good (``capture_error`` says why)."""
        if self._graphs is None:
            run(labels)
            return
        try:
            self._graphs.run((labels, tf32_enabled()), lambda: run(labels))
        except CaptureError as exc:  # raised after the eager run: this call's results stand
            if self._capture is True:
                raise
            self._graphs.clear()
            self._graphs, self.capture_error = None, str(exc)

    # ------------------------------------------------------------------ inputs
    def _shape_help(self, what: str) -> str:
        B, n_in, n_out = self.batch, self._x.shape[1], self._target.shape[-1]
        T = getattr(self, "tokens", None)
        if T is not None:
            x = (f"integer token ids {shape_str(self._x.shape)}" if self._ids is not None
                 else shape_str(self._x.shape))
            if what == "x":
                return f"token batches of {B} × T={T}: x must be {x}"
            return f"token batches of {B} × T={T} × {n_out} outputs: the target must be {shape_str(self._target.shape)}"
        if what == "x" and self._x.ndim > 2:
            return f"batch {B} of inputs {shape_str(self._x.shape[1:])}: x must be {shape_str(self._x.shape)}"
        if what == "x":
            return f"batch {B} × {n_in} features: x must be {shape_str((B, n_in))}"
        if self.loss == "softmax_cross_entropy":
            return f"batch {B} × {n_out} classes: the target must be int labels {shape_str((B,))} or rows {shape_str((B, n_out))}"
        return f"batch {B} × {n_out} outputs: the target must be {shape_str((B, n_out))}"

    def _check_device(self, a, name: str) -> None:
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            where = "CuPy" if self._gpu else "NumPy"
            raise TypeError(f"{name} must be a {where} array, not {type(a).__name__}")
        if is_gpu_array(a) != self._gpu:
            have, want = ("NumPy (CPU)", "GPU") if self._gpu else ("CuPy (GPU)", "CPU")
            raise TypeError(
                f"{name} is a {have} array but this step runs on the {want}; jacgrad never copies between "
                f"them silently — move it with jacgrad.to_device({name}, '{want.lower()}')"
            )
        if self._gpu and a.device.id != self._device.id:
            raise ValueError(f"{name} is on GPU {a.device.id} but this step's buffers are on GPU {self._device.id}")

    def _load(self, buf, a, name: str, help: str) -> None:
        ids = getattr(self, "_ids", None) if buf is self._x else None
        if ids is not None:  # token ids: the first layer's own check (integers in [0, V)), never cast
            a = ids(a, 0)
            self._check_device(a, name)
            if a.shape != buf.shape:
                raise ValueError(f"this step was compiled for {help}, got {shape_str(a.shape)}")
            self._xp.copyto(buf, a, casting="same_kind")
            return
        self._check_device(a, name)
        # x as every network entry point takes it (never rounded); the target as the losses take it
        a = network_input(a, name, self._xp, buf.dtype) if buf is self._x else float_array(a, name, self._xp)
        if a.shape != buf.shape:
            raise ValueError(f"this step was compiled for {help}, got {shape_str(a.shape)}")
        self._xp.copyto(buf, a, casting="same_kind")

    def _load_target(self, t) -> bool:
        """Copy the target into its buffer; True when it is integer labels (softmax CE)."""
        help = self._shape_help("target")
        if self.loss != "softmax_cross_entropy" or np.dtype(getattr(t, "dtype", np.float64)).kind == "f":
            if self.loss == "softmax_cross_entropy" and getattr(t, "ndim", 2) != 2:
                raise TypeError(f"labels must be integers but the target is a {t.dtype} array; {help}")
            self._load(self._target, t, "target", help)
            return False
        self._check_device(t, "target")
        if np.dtype(t.dtype).kind not in "iu":
            raise TypeError(f"target has dtype {t.dtype}; {help}")
        if t.shape != (self.batch,):
            raise ValueError(f"this step was compiled for {help}, got {shape_str(t.shape)}")
        C = self._target.shape[1]
        lo, hi = (int(v) for v in self._xp.stack([t.min(), t.max()]).tolist()) if self._gpu else (int(t.min()), int(t.max()))
        if lo < 0 or hi >= C:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} is out of range for C={C} classes (labels must be in [0, {C}))")
        self._xp.copyto(self._loss.labels, t, casting="same_kind")
        return True

    # ------------------------------------------------------------------ facts
    @property
    def captured(self) -> bool:
        """True when calls replay a CUDA graph (CuPy with capture 'auto' or True); False once
        ``capture="auto"`` fell back to buffers only because the capture failed (``capture_error``)."""
        return self._graphs is not None

    @property
    def graph_pool_bytes(self) -> int:
        """Device bytes held for the graphs' lifetime in their private pools: per graph, cuBLAS's
        workspace (32 MiB on sm_90, 4 MiB before) and whatever library calls allocated while being
        captured. 0 on the CPU and before the first capture."""
        return 0 if self._graphs is None else self._graphs.pool_bytes


def param_binding(net) -> list[tuple[str, Any]]:
    """``[(where, object)]`` that a recorded graph depends on: every parameter array (and layer,
    activation name) of ``net``, compared by identity (names by value) at each call."""
    if not hasattr(net, "weights"):  # a Sequential (an MLP's Dense layers hold what its lists hold)
        layers = tuple(net.layers)
        return [(f"layer {j} ({type(L).__name__})", L) for j, L in enumerate(layers)] + named_params(layers)
    K = len(net.weights)
    return ([(f"weights[{j}]", W) for j, W in enumerate(net.weights)]
            + [(f"biases[{j}]", b) for j, b in enumerate(net.biases)]
            + [(f"activations[{j}]", a) for j, a in enumerate(net.activations)] + [("depth", K)])


def _same(a, b) -> bool:
    return a == b if isinstance(a, (str, int)) else a is b


class IdentityBinding:
    """``_check_binding`` and ``rebind`` of a step that reruns the network's own code (the compiled
    Jacobian and the compiled products): ``self._bound`` (``param_binding``) compared by identity
    at every call; ``_what`` names the step in the messages."""

    _what = "step"

    def _check_binding(self) -> None:
        now = param_binding(self._net)
        if len(now) == len(self._bound) and all(_same(a, b) for (_, a), (_, b) in zip(now, self._bound)):
            return
        for (where, a), (_, b) in zip(now, self._bound):
            if not _same(a, b):
                break
        else:
            where = f"the network's structure ({len(now)} parameters and layers, compiled with {len(self._bound)})"
        raise RuntimeError(
            f"{where} is no longer what this {self._what} was compiled with. The step reads parameters by "
            f"reference: update them in place (W -= lr * dW), or call step.rebind() after replacing them")

    @locked
    def rebind(self) -> None:
        """Adopt the arrays (and layers) now in the network — same shapes, dtype and device — and drop
        the recorded graphs (the next call records again)."""
        now = param_binding(self._net)
        if len(now) != len(self._bound):
            raise ValueError(f"the network now has {len(now)} parameters and layers; this step was compiled for "
                             f"{len(self._bound)}: compile a new step")
        for (where, a), (_, b) in zip(now, self._bound):
            if hasattr(b, "shape") and hasattr(b, "dtype") and not hasattr(b, "params"):
                if not hasattr(a, "shape") or a.shape != b.shape or a.dtype != b.dtype or is_gpu_array(a) != self._gpu:
                    have = f"{shape_str(a.shape)} {a.dtype}" if hasattr(a, "shape") else type(a).__name__
                    raise ValueError(f"{where} is now {have}; this step was compiled for {shape_str(b.shape)} "
                                     f"{b.dtype} on the {'GPU' if self._gpu else 'CPU'}: compile a new step")
        if self._graphs is not None:
            self._graphs.clear()
        self._bound = now
