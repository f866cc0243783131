"""Lowering passes: exports to checkpoints, ONNX graphs and engines."""
