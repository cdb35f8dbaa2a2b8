"""Fused Triton kernels for the two-path network (one file per op; reference beside each)."""
