"""torch.func references for a torch model that jg.from_torch reads, shared by the checks of
tests/test_torch_capture.py and tests/test_zoo_tokens.py (``_check_against_torch``): per-sample
gradients of the loss ``((f(x_i) - t_i)**2).mean()`` and the NTK, each sample through
``torch.func.functional_call`` on a batch of one, vectorised by ``vmap``. Import it only after
``pytest.importorskip("torch")``: it imports torch."""

import numpy as np
import torch


def perturbed(make, dtype, seed=0):
    """``make()`` in ``dtype`` and eval mode, every parameter moved off its initial value by
    ``0.2·N(0, 1)`` (norm weights start at ones, which the references could not tell apart)."""
    torch.manual_seed(seed)
    model = make().to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _per_sample(model):
    """(the model's parameters, detached, by name; ``f(params, x_i)``, the output of one sample)."""

    def f(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0]

    return {k: p.detach() for k, p in model.named_parameters()}, f


def per_sample_grads(model, xt, tt) -> dict:
    """{parameter name: (B, *shape)}: sample i's gradient of ``((f(x_i) - t_i)**2).mean()``;
    ``xt``: (B, ...) inputs and ``tt``: (B, ...) targets, tensors."""
    params, f = _per_sample(model)

    def l_i(p, xi, ti):
        return ((f(p, xi) - ti) ** 2).mean()

    return torch.func.vmap(torch.func.grad(l_i), in_dims=(None, 0, 0))(params, xt, tt)


def grad_norms(per, B) -> np.ndarray:
    """(B,): each sample's gradient norm over every parameter of ``per_sample_grads``'s dict."""
    return torch.sqrt(sum((v.reshape(B, -1) ** 2).sum(1) for v in per.values())).numpy()


def ntk(model, xt, n_out) -> np.ndarray:
    """(B, B, O, O): ``K[i, j] = J_i J_jᵀ``, ``J_i`` (O, P) the Jacobian of sample i's ``n_out = O``
    outputs (flattened) in the parameters (``jacrev``, concatenated in ``named_parameters`` order)."""
    params, f = _per_sample(model)
    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(params, xt)
    J = torch.cat([v.reshape(len(xt), n_out, -1) for v in jac.values()], dim=2).numpy()
    return np.einsum("iop,jqp->ijoq", J, J)
