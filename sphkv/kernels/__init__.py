"""Triton kernels, one folder per op, each with a pure-torch reference beside it."""
