"""Pruning and sparse training to hardware-friendly patterns (block, N:M, unstructured)."""
