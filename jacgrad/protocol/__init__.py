"""jacgrad.protocol: What a layer implements and what every layer shares: the layer protocol and
its registry, the dense passes, the parameter leaves ((a, δ) pairs with a token axis) and the
per-token rows. May import core … algebra.
"""
