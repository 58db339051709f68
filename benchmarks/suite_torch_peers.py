"""The torch peers of the GPU suite's products section (``suite_products.py``): torch.func's per-sample
gradients, their norms and per-sample Jacobians of a torch model, and Opacus' clipped sum, each a
callable timed by the section (synchronised on CUDA)."""

from __future__ import annotations

from suite_blocks import _torch_sync as _sync

__all__ = ["opacus_peer", "torch_peers"]


def torch_peers(torch, model, xt, tt) -> dict:
    """torch.func's per-sample gradients, their norms and the per-sample Jacobians of ``model``."""
    try:
        from torch.func import functional_call, grad, jacrev, vmap
    except ImportError:
        return {}
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss_i(p, xi, ti):
        out = functional_call(model, p, (xi[None],))
        return 0.5 * ((out - ti[None]) ** 2).sum()

    per_sample = vmap(grad(loss_i), in_dims=(None, 0, 0))

    def norms():
        g = per_sample(params, xt, tt)
        return torch.sqrt(sum(v.flatten(1).pow(2).sum(1) for v in g.values()))

    jac = vmap(jacrev(lambda xi: functional_call(model, params, (xi[None],))[0]))
    return {"grads": _sync(torch, lambda: per_sample(params, xt, tt)), "norms": _sync(torch, norms),
            "jac": _sync(torch, lambda: jac(xt)) if xt.is_floating_point() else None}


def opacus_peer(torch, model, xt, tt):
    try:
        from opacus import GradSampleModule
    except ImportError:
        return "opacus is not importable"
    import copy

    gsm = GradSampleModule(copy.deepcopy(model).train())

    def step():
        gsm.zero_grad(set_to_none=True)
        loss = 0.5 * ((gsm(xt) - tt) ** 2).sum()
        loss.backward()
        norms = torch.sqrt(sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in gsm.parameters()))
        factor = (1.0 / torch.clamp(norms, min=1.0)).to(xt.device)
        return [(p.grad_sample * factor.view(-1, *([1] * (p.grad_sample.dim() - 1)))).sum(0) for p in gsm.parameters()]

    return _sync(torch, step)


# ---------------------------------------------------------------------- kernels and spectra
