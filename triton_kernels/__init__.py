"""Fused Triton kernels of ncrl_kernels, installed as ``ncrl_kernels.triton_kernels``.

Importing this package never imports Triton; the backend module does. ``ncrl_kernels`` imports it
when the package is imported, where Triton can run (CUDA or TRITON_INTERPRET=1): torch.compile
cannot import modules while it traces a call.
"""
