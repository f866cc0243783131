"""Pruning passes: unstructured and N:M sparsity (sparsity.py), structured width/depth pruning (structured.py)."""
