"""jacgrad.network: The network: Sequential, and MLP (a Sequential of Dense layers), with their
methods; and jg.torch (DP-SGD for a torch model through a Sequential). May import core … steps.
"""
