"""Triton kernels of monet_fast (installed as `monet_fast.kernels`), each beside a torch reference.

Kernels need Triton; on a CPU-only machine run them with TRITON_INTERPRET=1 (set before import).
"""
