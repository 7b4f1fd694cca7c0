"""Triton kernels, shipped as fastgrok.kernels: one fused op per file."""
