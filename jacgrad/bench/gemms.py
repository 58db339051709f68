"""The matrix products each task of ``jacgrad bench`` needs: its FLOPs and its GEMM floor.

Per task, ``(widths, B) -> [Gemm]`` with the shapes and transposes the task really multiplies
in; ``cases.TASKS`` names them. FLOP counts are 2 × the multiply-adds of the list, so every
backend of a case is credited with the same useful work.

    >>> [g.macs for g in forward_gemms([4, 3, 2], 5)]
    [60, 30]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..algebra.bracketing import peel_spine

__all__ = ["Gemm", "forward_gemms", "ggn_gemms", "jacobian_task_gemms", "ntk_gemms", "per_sample_gemms", "train_gemms",
           "vjp_gemms"]


@dataclass(frozen=True)
class Gemm:
    """One matrix product ``(M, K) @ (K, N)``, ``count`` independent ones when batched.

    ``layout``: ``"nn"``, ``"tn"`` (A stored ``(K, M)``, used transposed: ``zᵀ δ``) or
    ``"nt"`` (B stored ``(N, K)``: ``δ Wᵀ``) — the layouts the task really multiplies in.
    """

    m: int
    k: int
    n: int
    layout: str = "nn"
    count: int = 1

    @property
    def macs(self) -> int:
        return self.count * self.m * self.k * self.n



def forward_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    return [Gemm(B, a, b, "nn") for a, b in zip(widths[:-1], widths[1:])]


def _jacobian_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    """The products of ``Chain.jacobian("auto")`` for an MLP (every diagonal per sample),
    in the shapes ``jacgrad.algebra.bracketing.evaluate`` multiplies them."""
    from ..algebra.bracketing import plan

    K = len(widths) - 1
    w = list(widths)
    out: list[Gemm] = []

    def span(node) -> tuple[int, int]:
        if isinstance(node, int):
            return node, node
        return span(node[1])[0], span(node[0])[1]

    def walk(node) -> None:
        if isinstance(node, int):
            return
        left, right = node
        if isinstance(left, int):  # left spine: Pᵀ (B·n_in_part, H_in) @ W_k, one GEMM per leaf
            spine, node = peel_spine(node, 0)
            walk(node)
            first = span(node)[0]
            out.extend(Gemm(B * w[first], w[k], w[k + 1], "nn") for k in reversed(spine))
        elif isinstance(right, int):  # right spine: P (B·n_out_part, H_out) @ W_kᵀ
            spine, node = peel_spine(node, 1)
            walk(node)
            last = span(node)[1]
            out.extend(Gemm(B * w[last + 1], w[k + 1], w[k], "nt") for k in reversed(spine))
        else:  # two per-sample products: a batched GEMM
            walk(left)
            walk(right)
            (_, lj), (ri, rj) = span(left), span(right)
            out.append(Gemm(w[lj + 1], w[rj + 1], w[ri], "nn", count=B))

    walk(plan("auto", w, [True] * K, B).tree)
    return out


def train_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    grads_w = [Gemm(a, B, b, "tn") for a, b in zip(widths[:-1], widths[1:])]
    grads_in = [Gemm(B, b, a, "nt") for a, b in zip(widths[1:-1], widths[2:])]  # not into the input
    return forward_gemms(widths, B) + grads_w + grads_in


def vjp_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    return [Gemm(B, b, a, "nt") for a, b in zip(widths[:-1], widths[1:])]


def jacobian_task_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    return forward_gemms(widths, B) + _jacobian_gemms(widths, B)


def per_sample_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    """One training step (forward, ``zᵀδ``, ``δWᵀ``): what ``loss_and_grads`` needs, and all the
    GEMMs the norms need (their ``‖z‖²‖δ‖²`` products are elementwise)."""
    return train_gemms(widths, B)


def ntk_gemms(widths: Sequence[int], N: int) -> list[Gemm]:
    """The structured NTK ``Σ_j (Z_{j-1} Z_{j-1}ᵀ + 1) ⊙ (Δ_j Δ_jᵀ)``: a forward pass, the
    ``N·O`` cotangents swept back, and per layer the Gram of its inputs and of its deltas."""
    O = widths[-1]
    sweep = [Gemm(N * O, b, a, "nt") for a, b in zip(widths[1:-1], widths[2:])]
    grams = [Gemm(N, a, N, "nt") for a in widths[:-1]] + [Gemm(N * O, b, N * O, "nt") for b in widths[1:]]
    return forward_gemms(widths, N) + sweep + grams


def ggn_gemms(widths: Sequence[int], B: int) -> list[Gemm]:
    """A forward pass, the parameter JVP (one more GEMM per layer), the backward pass."""
    return train_gemms(widths, B) + forward_gemms(widths, B)
