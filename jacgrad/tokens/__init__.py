"""jacgrad.tokens: Token layers: MultiHeadAttention, Embedding and TransposeTokens, their factors and leaves (their
torch mapping is in io.interop). May import core … protocol.
"""
