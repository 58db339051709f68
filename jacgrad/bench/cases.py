"""What is timed: the cases of ``jacgrad bench``, their data, their FLOP counts and GEMM floors.

A case is one task on one network at one batch size:

- ``train``    — forward, MSE loss, and the gradients of every W and b (no input gradient);
- ``vjp``      — the input cotangent ``Jᵀv`` of an output cotangent ``v: (B, n_out)`` through a
                 network whose forward pass is already done (the VJP chain alone);
- ``jacobian`` — per-sample Jacobians ``∂y_b/∂x_b: (B, n_out, n_in)``, forward pass included.

Parameter-space tasks (opt-in with ``--tasks``; softmax cross-entropy on integer labels, the
argmax of ``NetData.target``), each timing several products whose rows carry a ``kind``:

- ``per_sample`` — ``loss_and_grads`` (the scale), per-sample gradient norms ``(B,)`` and
                   per-sample gradients (every W and b with a leading ``B``);
- ``ntk``        — the empirical NTK ``(N, N, O, O)`` of ``N = batch`` inputs;
- ``ggn``        — ``loss_and_grads``, the Gauss–Newton product ``G v: (P,)`` and ``diag G``.

Model tasks (opt-in with ``--tasks``; ``jacgrad.bench.models``, torch needed): ``cnn_norms`` and
``transformer_norms``, the issue's small CNN and 2-block transformer — ``loss_and_grads``, the
compiled step, per-sample gradient norms (auto, gram, instantiate) against torch's step and torch.func.

Networks are width lists ``[n_in, H_1, …, n_out]`` with the hidden activation on every layer
but the last (identity), as ``MLP.init`` builds them. The rectangular grid nets are
``depth × width`` (``8×1024`` is nine widths of 1024); named nets are ``tapering`` and
``hourglass`` or any dash list such as ``784-256-10``.

The GEMM floor of a case is the list of matrix products the task needs (``gemms``), with
their shapes and transposes: timed alone on a backend it is the time no implementation of the task can beat
there. FLOP counts are 2 × the multiply-adds of that list, so every backend of a case is
credited with the same useful work (for ``jacobian`` the cheapest bracketing's, from
``Chain.jacobian_cost("auto")``'s dynamic programme).

    >>> c = Case("train", [1024] * 9, 256)
    >>> c.label, round(c.flops / 1e9, 2)
    ('8×1024', 12.35)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .gemms import Gemm, ggn_gemms, jacobian_task_gemms, ntk_gemms, per_sample_gemms, train_gemms, vjp_gemms

__all__ = ["Case", "Gemm", "NAMED_NETS", "NetData", "PARAM_SPACE_TASKS", "TASKS", "Task", "default_tasks", "gemm_list",
           "make_data", "parse_net"]


NAMED_NETS = {
    "tapering": [512, 256, 128, 64, 10],
    "hourglass": [256, 256, 256, 8, 256, 256, 256],
}


def parse_net(spec: str) -> tuple[str, list[int]]:
    """``"tapering"`` or ``"784-256-10"`` → ``(name, widths)``; ValueError with the reason."""
    spec = spec.strip()
    if spec in NAMED_NETS:
        return spec, list(NAMED_NETS[spec])
    parts = spec.split("-")
    try:
        widths = [int(p) for p in parts]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(
            f"net {spec!r} is neither a named net ({', '.join(NAMED_NETS)}) nor at least two positive "
            "widths joined by '-' (like 784-256-10)"
        )
    return spec, widths


@dataclass
class Case:
    """``task`` on the net ``widths`` at batch ``batch``; ``name`` labels a named net."""

    task: str
    widths: list[int]
    batch: int
    name: str | None = None
    activation: str = "tanh"
    dtype: str = "float32"
    spec: dict | None = None  # a model task's sizes (``models.SIZES``); its net is built from them, not widths
    gemms: list[Gemm] = field(init=False)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        self.gemms = gemm_list(self.task, self.widths, self.batch)

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def label(self) -> str:
        """``8×1024`` for a rectangular net, else its name or dash list."""
        if self.name:
            return self.name
        w = self.widths
        if len(set(w)) == 1:
            return f"{self.depth}×{w[0]}"
        return "-".join(map(str, w))

    @property
    def flops(self) -> int:
        return 2 * sum(g.macs for g in self.gemms)

    def key(self) -> str:
        return f"{self.task} {self.label} B={self.batch}"

    @property
    def parameters(self) -> int:
        """Weights and biases of the net: ``Σ H_{j-1}·H_j + H_j``."""
        w = self.widths
        return sum(a * b + b for a, b in zip(w[:-1], w[1:]))

    def memory_bytes(self) -> int:
        """A lower bound of the host memory the case needs (bytes): ``make_data``'s two float64
        copies of the parameters (the initialised net and the dtype-rounded master copy), one
        backend's copy in the case's dtype, the float64 inputs, one ``(B, H_j)`` array per layer
        of the forward pass, and the ``(B, n_out, n_in)`` result of the jacobian task."""
        item = np.dtype(self.dtype).itemsize
        w, B = self.widths, self.batch
        total = (16 + item) * self.parameters + 8 * B * (w[0] + 2 * w[-1]) + item * B * sum(w[1:])
        if self.task == "jacobian":
            total += item * B * w[0] * w[-1]
        elif self.task == "per_sample":  # the (B, P) per-sample gradients, and their float64 copy
            total += (item + 8) * B * self.parameters
        elif self.task == "ntk":  # the (N·O)² kernel, and the (N·O, H_j) deltas of the sweep
            total += item * (B * w[-1]) ** 2 + item * B * w[-1] * max(w)
        elif self.task == "ggn":  # v, G v and diag G
            total += 3 * item * self.parameters
        return total


@dataclass(frozen=True)
class Task:
    """One row of the task table. ``grid``: ``"rect"`` runs on the batch × width × depth grid of
    rectangular nets, ``"nets"`` on the ``--nets`` list at the ``--jac-batch`` sizes; ``gemms``:
    ``(widths, B) -> [Gemm]``, the products the task needs (its FLOPs and its GEMM floor).
    ``"param"`` on ``--param-nets`` at ``--param-batch``, ``"ntk"`` on ``--ntk-nets`` with
    ``--ntk-n`` inputs. ``"model"``: the issue's CNN or transformer (``models``) at ``--model-size``,
    with no GEMM floor. ``default``: run when ``--tasks`` is not given.
    A new task is a row here plus a branch in each backend's ``prepare`` (a backend whose
    ``supports(task)`` is False sits the task out)."""

    grid: str
    gemms: Callable[[Sequence[int], int], list[Gemm]]
    default: bool = True


TASKS: dict[str, Task] = {
    "train": Task("rect", train_gemms),
    "vjp": Task("rect", vjp_gemms),
    "jacobian": Task("nets", jacobian_task_gemms),
    "per_sample": Task("param", per_sample_gemms, default=False),
    "ntk": Task("ntk", ntk_gemms, default=False),
    "ggn": Task("param", ggn_gemms, default=False),
    "cnn_norms": Task("model", lambda widths, B: [], default=False),
    "transformer_norms": Task("model", lambda widths, B: [], default=False),
}
PARAM_SPACE_TASKS = ("per_sample", "ntk", "ggn")


def default_tasks() -> list[str]:
    """The tasks ``jacgrad bench`` runs without ``--tasks``: ``['train', 'vjp', 'jacobian']``."""
    return [name for name, t in TASKS.items() if t.default]


def gemm_list(task: str, widths: Sequence[int], B: int) -> list[Gemm]:
    """The matrix products ``task`` needs on the net ``widths`` at batch ``B``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    return TASKS[task].gemms(widths, B)


@dataclass
class NetData:
    """The float64 master copy every backend converts from, so all compute the same numbers.

    ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)``, ``x: (B, n_in)``, ``target: (B, n_out)``,
    ``v: (B, n_out)`` — already rounded to the case's dtype, then held as float64.
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    activations: list[str]
    x: np.ndarray
    target: np.ndarray
    v: np.ndarray
    dtype: str

    def cast(self, a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=self.dtype)

    @property
    def labels(self) -> np.ndarray:
        """``(B,)`` int64 class labels of the parameter-space tasks: the argmax of ``target``."""
        return np.argmax(self.target, axis=1).astype(np.int64)

    @property
    def parameters(self) -> int:
        return sum(W.size + b.size for W, b in zip(self.weights, self.biases))

    def direction(self) -> np.ndarray:
        """``(P,)`` the ``v`` of ``ggn_vp`` in ``Gradients.flat`` order (W_0, b_0, W_1, …), seeded."""
        v = np.random.default_rng(len(self.weights)).standard_normal(self.parameters)
        return np.asarray(v, dtype=self.dtype).astype(np.float64)


def make_data(case: Case, seed: int = 0) -> NetData:
    """Xavier-normal weights, small biases and Gaussian inputs for ``case`` (seeded)."""
    from ..network.mlp import MLP

    net = MLP.init(case.widths, activation=case.activation, output_activation="identity",
                   init="xavier_normal", bias_std=0.1, seed=seed, dtype="float64")
    rng = np.random.default_rng(seed + 1)
    B, n_in, n_out = case.batch, case.widths[0], case.widths[-1]

    def rounded(a: Any) -> np.ndarray:
        return np.asarray(a, dtype=case.dtype).astype(np.float64)

    return NetData(
        weights=[rounded(W) for W in net.weights],
        biases=[rounded(b) for b in net.biases],
        activations=list(net.activations),
        x=rounded(rng.standard_normal((B, n_in))),
        target=rounded(0.5 * rng.standard_normal((B, n_out))),
        v=rounded(rng.standard_normal((B, n_out))),
        dtype=case.dtype,
    )
