"""jacgrad.params: Parameter-space products from a network's (a, δ) pairs: per-sample gradients and
norms, the NTK, Gauss–Newton products (curvature), private (clipped, noised) gradients, and the free
functions jg.ntk, jg.per_sample_grad_norms, …. May import core … io.
"""
