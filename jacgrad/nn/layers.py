"""Layers of a ``jacgrad.Sequential``: ``Dense``, ``Residual``, ``LayerNorm``, ``RMSNorm``, ``Activation``,
``Embedding``, ``MultiHeadAttention``.

Each layer implements the layer protocol (``jacgrad.protocol.layer.Layer``) in a module of its
own (``dense_layer``, ``norm_layers``, ``residual_layer``, ``embedding``, ``attention``) and
registers its kind there: its
``forward`` (the output and the least state its backward needs), its ``backward`` (parameter
gradients written into the views it is given, and ∂L/∂input), its Jacobian ``factor`` for
``Chain``, its parameter leaves (``jacgrad.protocol.leaves``) and its file ``spec``. Dense, the
norms, the activations and Residual act per token on ``(B, T, d)`` inputs too.

``forward``/``backward`` write into the buffers given as ``out`` (the shapes their layer's
``forward_shapes(B)`` / ``backward_shapes(B, input_grad)`` name), or into fresh arrays when
``out`` is None: ``Sequential`` hands them pooled blocks per call, a compiled step the same
buffers every call (``_block_passes``). ``backward`` only reads the cotangent it is given.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.LayerNorm(np.ones(4), np.zeros(4))
    >>> y, state = L.forward(np.arange(8.0).reshape(2, 4))
    >>> y.shape, L.factor(state).h_in
    ((2, 4), 4)
"""

from __future__ import annotations

from ..protocol.token_rows import PerToken, TokenState
from .dense import Dense
from ..protocol.layer import chained, layer_class, layer_kinds, leaf_layers, named_params, register_layer
from .norms import NORMS, LayerNorm, RMSNorm, make_norm
from .residual import Residual
# the convolutional family: one module per concept, each registering its kinds
from ..conv.batchnorm import BatchNorm1d, BatchNorm2d
from ..conv.layers import Conv1d, Conv2d
from ..conv.pools import AdaptiveAvgPool2d, AvgPool2d, Flatten, MaxPool2d
from ..conv.prelu import PReLU
from ..tokens.attention import MultiHeadAttention  # token layers, each in a module of its own
from ..tokens.embedding import Embedding
from ..tokens.transpose import TransposeTokens
from ..tokens.positional import PositionalEmbedding
from ..tokens.token_maps import ClassToken, SelectToken, TokenMean
from ..tokens.image_tokens import ImageToTokens
from .activation import Activation  # registered after the layers with parameters (kinds in that order)

__all__ = ["Activation", "AdaptiveAvgPool2d", "AvgPool2d", "BatchNorm1d", "BatchNorm2d", "ClassToken", "Conv1d", "Conv2d", "Dense", "Embedding", "Flatten", "ImageToTokens", "LayerNorm", "MaxPool2d", "MultiHeadAttention", "NORMS", "PReLU", "PerToken", "PositionalEmbedding", "RMSNorm", "Residual", "SelectToken", "TokenMean", "TokenState", "TransposeTokens", "chained", "layer_class", "layer_kinds", "leaf_layers",
           "make_norm", "named_params", "register_layer"]

LAYER_TYPES = (Dense, LayerNorm, RMSNorm, Residual, Activation)
