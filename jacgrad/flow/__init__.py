"""jacgrad.flow: The gradient-flow report: statistics, per-layer and per-block rows, verdict, plot,
JSON, and jg.Monitor for training loops. May import core … distributed.
"""
