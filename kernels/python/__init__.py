"""Python side of the kernels: quantized module forms shared by the passes, the exporters and the loaders.

CUDA sources and TensorRT plugins live beside this folder (kernels/csrc, kernels/plugins) as they are added.
"""
