"""``jg.Monitor``: the gradient-flow report during training, a row every ``every`` steps.

In a plain torch loop, call ``monitor.step()`` after ``optimizer.step()``; every ``every``-th call
imports the model (a live view of its parameters, ``copy=False``: nothing is copied), runs
``jg.gradient_flow`` on the probe batch ``x_probe`` and appends one JSON line to ``log``:

    {"step": 100, "time": 1733590000.1, "elapsed": 12.5, "seconds": 0.004, "verdict": "healthy",
     "chi_bar": 0.93, "backward_gain": 0.81, "jacobian_spectral_norm": 1.7, "loss": 2.2,
     "spectrum_samples": 16, "norm_samples": 16, "rows": "layers",
     "layers": [{"index": 0, "module": "0", "grad_norm": 0.41, "chi": 0.88, "spectral_norm": 1.3,
                 "dead_fraction": 0.02}, ...]}

``time`` is the Unix time, ``elapsed`` the seconds since the monitor was made, ``seconds`` what
the report took. A dense stack (``nn.Linear`` and activations) has a row per layer (``rows:
"layers"``, with the torch module's name); a model with norms or residual blocks
(``Sequential.from_torch``) a row per block (``rows: "blocks"``, no dead fraction: null). Per row:
``grad_norm`` ‖∂L/∂W_j‖ (of ``loss`` against ``target``, or of a random unit cotangent when there
is no target: the network itself), ``chi`` (χ_j), ``spectral_norm`` (‖J_j‖₂, the batch mean) and
``dead_fraction`` (units whose φ' is 0 on every probe sample). With a ``writer`` (anything with
TensorBoard's ``add_scalar(tag, value, step)``, e.g. ``torch.utils.tensorboard.SummaryWriter``:
tensorboard is not required) the same numbers go to ``jacgrad/<module>/<name>`` tags, with
``jacgrad/chi_bar``, ``jacgrad/jacobian_spectral_norm`` and ``jacgrad/verdict`` (−1 vanishing,
0 healthy, 1 exploding).

``spectra``: the costly part of a report is each layer's ‖J_j‖₂ and the input-output spectrum.
``"subsample"`` (default) measures them on a seeded subsample of ``samples`` probe rows (the
same rows every time; every other number is over the whole probe), ``"all"`` on every row,
``"off"`` writes null for ``spectral_norm`` and ``jacobian_spectral_norm`` (they are measured on
one sample only, the cheapest report: skipping the spectrum outright would estimate the mean
squared singular value from random directions over every row, which costs more). The model is imported in eval mode (train mode is restored
at once): the report is of the deterministic network, and Dropout passes through.

Lightning: ``monitor.callback()`` is a ``lightning.pytorch.Callback`` (or ``pytorch_lightning``'s)
that calls ``step(trainer.global_step)`` after each training batch; the optional import happens
there. ``jacgrad report --log run.jsonl`` prints a run's history and plots it (``--out``).

    >>> import torch, numpy as np, tempfile, os, jacgrad as jg
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> log = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    >>> x_probe = np.random.default_rng(0).standard_normal((32, 4), dtype=np.float32)
    >>> mon = jg.Monitor(model, x_probe, every=2, log=log)
    >>> [mon.step() is not None for _ in range(4)]
    [False, True, False, True]
    >>> [row["step"] for row in jg.monitor.read_log(log)]
    [2, 4]
"""

from __future__ import annotations

import json
import math
import os
import time
import numpy as np

from ..io.file_safety import quote
from ..core.validation import check_input_dtype
from ..core.backend import asarray
from ..models.checkpoints import network_from_torch, parameter_places
from .diagnostics import gradient_flow
from .report import _json_safe

__all__ = ["Monitor", "SPECTRA", "VERDICT_CODE", "lightning_callback_class", "read_log"]

SPECTRA = ("subsample", "all", "off")
VERDICT_CODE = {"vanishing": -1, "healthy": 0, "exploding": 1}
ROW_FIELDS = ("grad_norm", "chi", "spectral_norm", "dead_fraction")


class Monitor:
    """The gradient-flow report of ``model`` on ``x_probe: (B, n_in)`` every ``every`` steps (see
    the module docstring). ``target``/``loss``: as for ``jg.gradient_flow``; ``samples``: the
    subsample of ``spectra="subsample"``; ``seed``: its rows and the cotangents; ``log``: a JSONL
    file appended to (None: none), ``writer``: an ``add_scalar`` sink (None: none). ``rows`` holds
    every row written, ``last`` the last report."""

    def __init__(self, model, x_probe, every: int = 100, log: str | os.PathLike | None = "run.jsonl", writer=None,
                 target=None, loss: str = "mse", spectra: str = "subsample", samples: int = 8, seed: int = 0):
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            raise ValueError(f"every={every!r}: give the number of steps between reports, an int >= 1")
        if spectra not in SPECTRA:
            raise ValueError(f"spectra={spectra!r}: valid values are {', '.join(map(repr, SPECTRA))}")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"samples={samples!r}: the subsample's size, an int >= 1")
        if writer is not None and not callable(getattr(writer, "add_scalar", None)):
            raise TypeError(f"writer={type(writer).__name__}: it has no add_scalar(tag, value, step) method "
                            f"(a torch.utils.tensorboard.SummaryWriter has)")
        self.model, self.every, self.writer, self.loss, self.spectra = model, int(every), writer, loss, spectra
        self.log = None if log is None else os.fspath(log)
        if self.log is not None and os.path.isdir(self.log):
            raise ValueError(f"log={self.log!r} is a directory; give the JSONL file to append to")
        x = asarray(x_probe)
        t = None if target is None else asarray(target)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"x_probe has shape {tuple(x.shape)}; give a (B, n_in) batch with B >= 1")
        if t is not None and len(t) != len(x):
            raise ValueError(f"target has {len(t)} rows but x_probe has {len(x)}")
        self.samples = min(int(samples), len(x)) if spectra == "subsample" else None
        if spectra == "subsample" and self.samples < len(x):
            # a seeded subsample in front: the spectrum reads the first rows, the ‖J_j‖₂ the same seeded ones
            order = np.random.default_rng([seed, 22]).permutation(len(x))
            x, t = x[order], (None if t is None else t[order])
        self.x_probe, self.target, self.seed = x, t, int(seed)
        self.step_count, self.rows, self.last = 0, [], None
        self._last_step, self._names, self._start = None, None, time.time()
        net = self._network()  # now, not at step `every`: a model the importer refuses, a probe that does not fit
        check_input_dtype("x_probe", x.dtype, net.dtype)
        if x.shape[1] != net.sizes[0]:
            raise ValueError(f"x_probe has shape {tuple(x.shape)} but the model takes (B, {net.sizes[0]}) inputs")

    # ------------------------------------------------------------------ the loop
    def step(self, global_step: int | None = None):
        """Count one optimiser step (or set the count to ``global_step``); at every ``every``-th step
        write a row and return the report, else return None."""
        self.step_count = self.step_count + 1 if global_step is None else int(global_step)
        if self.step_count % self.every or self.step_count == self._last_step:
            return None
        return self.record()

    def record(self, step: int | None = None):
        """Write a row now (at ``step``, default the current count) and return the report."""
        step = self.step_count if step is None else int(step)
        began = time.perf_counter()
        net = self._network()
        counts = {"subsample": (self.samples, self.samples), "all": (None, None), "off": (1, 1)}[self.spectra]
        rep = gradient_flow(net, self.x_probe, self.target, self.loss, seed=self.seed, spectrum_samples=counts[0],
                            norm_samples=counts[1], label=f"step {step}")
        row = self._row(step, rep, time.perf_counter() - began)
        self._write(row)
        self.rows.append(row)
        self.last, self._last_step = rep, step
        return rep

    def _network(self):
        """The model as a jacgrad network over its parameters' own memory, imported in eval mode."""
        if not hasattr(self.model, "modules"):
            return self.model  # a jacgrad network already
        net = network_from_torch(self.model, copy=False, eval_mode=True)
        if self._names is None:
            self._names = {p.key.rsplit(".", 1)[0]: p.torch_name.rsplit(".", 1)[0]
                           for p in parameter_places(self.model, net) if p.torch_name is not None}
        return net

    # ------------------------------------------------------------------ the row
    def _row(self, step: int, rep, seconds: float) -> dict:
        layers = []
        if rep.layers:
            for L in rep.layers:
                layers.append({"index": L.index, "module": (self._names or {}).get(str(L.index)),
                               "grad_norm": L.grad_norm, "chi": L.chi,
                               "spectral_norm": None if self.spectra == "off" else L.jacobian_norm,
                               "dead_fraction": None if L.dead_units is None else L.dead_units / L.shape[1]})
        else:
            for b in rep.blocks:
                layers.append({"index": b.index, "module": (self._names or {}).get(str(b.index)), "kind": b.kind,
                               "grad_norm": b.grad_norm, "chi": b.chi,
                               "spectral_norm": None if self.spectra == "off" else b.jacobian_norm,
                               "dead_fraction": None})
        return _json_safe({
            "step": step, "time": time.time(), "elapsed": time.time() - self._start, "seconds": seconds,
            "verdict": rep.verdict, "chi_bar": rep.chi_bar, "backward_gain": rep.backward_gain,
            "jacobian_spectral_norm": None if self.spectra == "off" else rep.jacobian_spectral_norm,
            "loss": rep.loss_value, "spectrum_samples": rep.spectrum_samples, "norm_samples": rep.norm_samples,
            "rows": "layers" if rep.layers else "blocks", "layers": layers,
        })

    def _write(self, row: dict) -> None:
        if self.log is not None:
            with open(self.log, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n")
        if self.writer is not None:
            for tag, value in scalars(row):
                self.writer.add_scalar(tag, value, row["step"])

    # ------------------------------------------------------------------ Lightning
    def callback(self):
        """A Lightning ``Callback`` that calls ``self.step(trainer.global_step)`` after every
        training batch (``lightning.pytorch`` or ``pytorch_lightning``, whichever imports)."""
        return lightning_callback_class()(self)


def scalars(row: dict):
    """``(tag, value)`` of the row's finite numbers, as TensorBoard tags."""
    out = [("jacgrad/verdict", VERDICT_CODE[row["verdict"]])]
    for key in ("chi_bar", "backward_gain", "jacobian_spectral_norm", "loss"):
        out.append((f"jacgrad/{key}", row[key]))
    for L in row["layers"]:
        name = L["module"] if L["module"] is not None else str(L["index"])
        out += [(f"jacgrad/{name}/{k}", L[k]) for k in ROW_FIELDS]
    return [(tag, float(v)) for tag, v in out if isinstance(v, (int, float)) and math.isfinite(v)]


_CALLBACK: dict = {}


def lightning_callback_class():
    """The ``Callback`` subclass behind ``Monitor.callback()``, built on first use from
    ``lightning.pytorch`` or else ``pytorch_lightning``; an ``ImportError`` saying what to install
    when neither imports."""
    import importlib

    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            base = importlib.import_module(name).Callback
            break
        except (ImportError, AttributeError):
            continue
    else:
        raise ImportError("Monitor.callback() needs Lightning: pip install lightning (or pytorch-lightning); "
                          "in a plain loop call monitor.step() after optimizer.step()")
    if base not in _CALLBACK:
        def __init__(self, monitor: Monitor):
            base.__init__(self)
            self.monitor = monitor

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.monitor.step(trainer.global_step)

        _CALLBACK[base] = type("JacgradMonitor", (base,), {"__init__": __init__, "on_train_batch_end": on_train_batch_end,
                                                           "__module__": __name__})
    return _CALLBACK[base]


def read_log(path) -> list[dict]:
    """The rows of a Monitor's JSONL file, in order; a line that is not a row is a ``ValueError``
    naming the file and the line."""
    path = os.fspath(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise ValueError(f"log {path!r}, line {n}: not JSON: {quote(line.strip())}") from None
            if not isinstance(row, dict) or not {"step", "verdict", "layers"} <= set(row):
                raise ValueError(f"log {path!r}, line {n}: not a jacgrad Monitor row (step, verdict, layers): "
                                 f"{quote(line.strip())}")
            rows.append(row)
    return rows
