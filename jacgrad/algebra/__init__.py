"""jacgrad.algebra: The factor algebra: LayerJacobian diag(d)·Wᵀ and the other structured factors
(norms, residual, per token, diagonal), chains, their bracketing and evaluation, spectra and
Lanczos, the per-sample (a, δ) sweeps, finite-difference checks. Knows no
network. May import core … cuda.
"""
