"""Triton kernels. One kernel per file, beside its launcher and its torch reference."""
