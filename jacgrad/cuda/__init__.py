"""jacgrad.cuda: The GPU plumbing: the elementwise, norm and softmax-Jacobian kernels (built from kernels/*.cu,
reading the activation table), GEMMs, CUDA graphs and the reused host blocks. May import core,
elementwise.
"""
