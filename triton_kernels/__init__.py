"""Fused Triton kernels of ncrl_kernels, installed as ``ncrl_kernels.triton_kernels``.

Importing this package never imports Triton; the backend module does, on first use.
"""
