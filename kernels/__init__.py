"""Compute kernels: Triton on CUDA, torch references on the CPU (see `kernels.ops`)."""
