"""Decoding strategies over the shared decoder: AR beam search, mask-predict, self-speculative."""
