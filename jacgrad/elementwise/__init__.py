"""jacgrad.elementwise: The elementwise tables, one row per op: the activations (forward,
derivative, derivative from the output, bound, CUDA device function) and the gates with their
VJPs. May import core.
"""
