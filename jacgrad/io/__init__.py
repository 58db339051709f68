"""jacgrad.io: Files and other frameworks: the network file format, its readers, layouts and safety
checks, checkpoint keys, and interop/ (torch module walks, sklearn, flax). May import core … nn.
"""
