"""Issue 22, item 2: the two silent results of shared parameters, before and after.

(a) one nn.Linear listed twice in an nn.Sequential: the old walk read the module once (the
    second use dropped); (b) tied weights (``b.weight = a.weight``; a tied unembedding): the old
    importers made two independent parameters. "Before" is rebuilt here from the layers of the
    network imported now (the second use dropped, or every use given a copy of its array), so
    the script runs on any version. It prints P against torch's and the NTK's relative error
    (Frobenius) against torch.func's ``vmap(jacrev)``, float64.

    python benchmarks/shared_before_after.py
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import torch
from torch.func import functional_call, jacrev, vmap

import jacgrad as jg

sys.path.insert(0, "tests")
from test_shared_params import ReusedLinear, TiedLinears, reused_sequential, tied_unembedding  # noqa: E402

L = jg.layers


def ntk_ref(model, x):
    model = copy.deepcopy(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = vmap(jacrev(lambda p, x: functional_call(model, p, (x[None],))[0].reshape(-1)), in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in J.values()], dim=2).numpy()
    return np.einsum("aop,bqp->aboq", J, J)


def untied(net):
    """Every use of every array its own copy: the old importers' two independent parameters."""
    def fresh(Lr):
        if isinstance(Lr, L.Dense):
            return L.Dense(Lr.W.copy(), Lr.b.copy(), Lr.activation)
        if isinstance(Lr, L.Embedding):
            return L.Embedding(Lr.params[0].copy())
        if isinstance(Lr, L.LayerNorm):
            return L.LayerNorm(*[p.copy() for p in Lr.params])
        return Lr
    return jg.Sequential([fresh(Lr) for Lr in net.layers])


def dropped(net):
    """The second use of a re-used layer left out: the old walk's network."""
    seen, out = set(), []
    for Lr in net.layers:
        if isinstance(Lr, L.Dense) and id(Lr.W) in seen:
            continue
        seen.add(id(Lr.W) if isinstance(Lr, L.Dense) else id(Lr))
        out.append(Lr)
    return jg.Sequential(out)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    torch.manual_seed(0)
    cases = []
    m = reused_sequential()
    x = torch.randn(6, 3, dtype=torch.float64)
    cases.append(("(a) nn.Linear listed twice", m, x, jg.Sequential.from_torch(m), dropped))
    torch.manual_seed(1)
    m = TiedLinears().double()
    cases.append(("(b) b.weight = a.weight", m, x, jg.from_torch(m, x), untied))
    m = tied_unembedding()
    ids = torch.randint(0, 9, (6, 4))
    cases.append(("(b) tied unembedding", m, ids, jg.Sequential.from_torch(m), untied))
    for name, model, xin, net, old in cases:
        P = sum(p.numel() for p in model.parameters())
        K = ntk_ref(model, xin)
        before = old(net)
        xs = xin.numpy()
        Kb = jg.ntk(before, xs)
        nb = f"NTK rel. error {rel(Kb, K):.2e}" if Kb.shape == K.shape else f"output differs by {np.abs(before(xs) - model(xin).detach().numpy()).max():.2e}"
        print(f"{name}: torch P={P}; before P={before.n_params}, {nb}; after P={net.n_params}, "
              f"NTK rel. error {rel(jg.ntk(net, xs), K):.2e}")


if __name__ == "__main__":
    main()
