"""Distillation: the compressed model learns back from the original (distill.py)."""
