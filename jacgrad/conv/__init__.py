"""jacgrad.conv: The convolutional family: Conv1d/Conv2d, pools, Flatten, eval BatchNorm, their
im2col operators, factors and leaves. May import core … protocol.
"""
