"""The checks of a jacgrad network against torch.func, shared by the ViT token-layer tests
(``test_token_layers_vit.py``, ``test_zoo_vit.py``): every quantity computed by torch on a function
``f(theta, x_i)`` of the flat parameters (jacgrad's ``Gradients.flat`` order) and one sample."""

import numpy as np
import torch

TOL = {np.float64: 1e-10, np.float32: 1e-4}


def flat_params(net) -> np.ndarray:
    """The network's parameters in ``Gradients.flat`` order."""
    from jacgrad.protocol.layer import leaf_layers

    return np.concatenate([p.ravel() for _, L in leaf_layers(net.layers) for p in L.params])


def unflatten(theta, shapes):
    """``theta`` cut into tensors of ``shapes`` (in order)."""
    parts, at = [], 0
    for shape in shapes:
        k = int(np.prod(shape))
        parts.append(theta[at:at + k].reshape(shape))
        at += k
    return parts


def close(a, b, tol, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    scale = max(1.0, float(np.abs(b).max()) if b.size else 1.0)
    err = float(np.abs(a - b).max()) / scale if a.size else 0.0
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def check_products(net, f, x, t, tol, products=("forward", "grad", "norms", "per_sample", "ntk", "ggn")):
    """``net`` against torch.func on ``f(theta, x_i) -> y_i`` (theta flat, one sample), loss mse:
    the forward, the batch gradient, per-sample gradients and their norms (all three methods),
    the NTK, the Gauss-Newton product and diagonal. ``x``, ``t``: NumPy batches."""
    import jacgrad as jg

    theta = torch.tensor(flat_params(net))
    X, T = torch.tensor(x), torch.tensor(t)
    B = x.shape[0]
    fb = torch.func.vmap(f, in_dims=(None, 0))
    if "forward" in products:
        close(net(x), fb(theta, X).detach().numpy(), tol, "forward")
    if "grad" in products:
        gt = torch.func.grad(lambda th: ((fb(th, X) - T) ** 2).mean())(theta)
        close(net.loss_and_grads(x, t)[1].flat, gt.numpy(), tol, "batch gradient")
    g = torch.func.vmap(torch.func.grad(lambda th, xi, ti: ((f(th, xi) - ti) ** 2).mean()),
                        in_dims=(None, 0, 0))(theta, X, T).numpy()
    if "per_sample" in products:
        close(net.per_sample_grads(x, t).flat, g, tol, "per-sample gradients")
    if "norms" in products:
        for method in ("auto", "gram", "instantiate"):
            close(net.per_sample_grad_norms(x, t, method=method), np.linalg.norm(g, axis=1), tol, f"norms {method}")
    if "ntk" in products or "ggn" in products:
        J = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(theta, X).reshape(B, -1, theta.numel()).numpy()
    if "ntk" in products:
        close(jg.ntk(net, x), np.einsum("iop,jqp->ijoq", J, J), tol, "ntk")
        close(jg.ntk(net, x, trace=True), np.einsum("iop,jop->ij", J, J), tol, "ntk trace")
    if "ggn" in products:
        G = np.einsum("iop,ioq->pq", J, J) * (2 / J.shape[1]) / B   # mse over a sample's outputs: H_i = 2/O · I
        v = np.random.default_rng(1).standard_normal(theta.numel()).astype(x.dtype)
        close(net.ggn_vp(x, v, t), G @ v, tol, "ggn_vp")
        close(net.ggn_diagonal(x, t).flat, np.diag(G), tol, "ggn_diagonal")


def check_factor(layer, x, fx, tol, seed=0, flat_in=False):
    """One layer's Jacobian factor at ``x`` against torch: ``vjp``/``jvp`` (and their stacks) against
    ``torch.func.vjp``/``jvp`` of ``fx`` (the layer's map of the whole batch, a torch function), the
    adjoint identity ⟨v, J u⟩ = ⟨Jᵀ v, u⟩, and the dense per-sample Jacobian. The factor takes
    rows shaped as the batch, or (``flat_in``, an image input) flat ``(B, C·H·W)`` as a conv's."""
    rng = np.random.default_rng(seed)
    y, state = layer.forward(x)
    F = layer.factor(state)
    X = torch.tensor(x)
    close(y, fx(X).numpy(), tol, "forward")
    u = rng.standard_normal(x.shape).astype(x.dtype)
    v = rng.standard_normal(y.shape).astype(x.dtype)
    _, Ju = torch.func.jvp(fx, (X,), (torch.tensor(u),))
    _, pull = torch.func.vjp(fx, X)
    (JTv,) = pull(torch.tensor(v))
    in_rows = (x.shape[0], int(np.prod(x.shape[1:]))) if flat_in else x.shape
    out_rows = y.shape
    close(F.jvp(u.reshape(in_rows)).reshape(y.shape), Ju.numpy(), tol, "jvp")
    close(F.vjp(v.reshape(out_rows)).reshape(x.shape), JTv.numpy(), tol, "vjp")
    lhs, rhs = float((v * Ju.numpy()).sum()), float((F.vjp(v.reshape(out_rows)).reshape(x.shape) * u).sum())
    assert abs(lhs - rhs) <= tol * max(1.0, abs(lhs)), f"adjoint: {lhs} vs {rhs}"
    R = 3
    U = rng.standard_normal((x.shape[0], R) + in_rows[1:]).astype(x.dtype)
    V = rng.standard_normal((x.shape[0], R) + out_rows[1:]).astype(x.dtype)
    JU = np.stack([F.jvp(U[:, r]) for r in range(R)], axis=1)
    JTV = np.stack([F.vjp(V[:, r]) for r in range(R)], axis=1)
    close(F.jvp_stack(U), JU, tol, "jvp_stack")
    close(F.vjp_stack(V), JTV, tol, "vjp_stack")
    Jt = torch.func.vmap(torch.func.jacrev(lambda xi: fx(xi[None])[0]))(X).numpy()
    Jt = Jt.reshape(x.shape[0], int(np.prod(y.shape[1:])), int(np.prod(x.shape[1:])))
    from jacgrad.algebra.token_factor import FlatTokens

    D = (FlatTokens(F) if getattr(F, "tokens", None) is not None else F).dense()
    close(D, Jt, tol, "dense")
    return F, state

