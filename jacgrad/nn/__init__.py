"""jacgrad.nn: The dense family of layers (Dense, LayerNorm, RMSNorm, Residual, Activation), the
façade jacgrad.nn.layers that exports every layer, the passes through a stack of layers, losses and
their Hessians, initialisers. May import core … tokens.
"""
