"""jacgrad.steps: Compiled steps: buffers once, parameters by reference, one CUDA graph on CuPy —
the training step, the compiled Jacobian, the private step, the compiled products
(``net.compile(B, product=...)``). May import core … params.
"""
