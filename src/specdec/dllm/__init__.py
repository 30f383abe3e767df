"""Block-diffusion LMs: the model spec and conversion, the engine, and the parallel-decoding policies.

Not lossless: every policy trades quality for tokens per forward, and the bench reports both.
"""
