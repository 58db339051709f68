"""jacgrad.tokens: Token layers: MultiHeadAttention and Embedding, their factors and leaves (their
torch mapping is in io.interop). May import core … protocol.
"""
