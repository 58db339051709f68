"""jacgrad.tokens: Token layers: MultiHeadAttention, Embedding, TransposeTokens and the ViT token layers (PositionalEmbedding, …), their factors and leaves (their
torch mapping is in io.interop). May import core … protocol.
"""
