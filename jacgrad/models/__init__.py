"""jacgrad.models: Any torch model in: graph capture (jg.from_torch), jg.explain, the op table,
named checkpoints (jg.load). May import core … network.
"""
