"""Numba CUDA kernels for LLM.int8() (threshold decomposition, vector-wise
quantization, int8 GEMM with fused dequantization). Filled in by the kernels issue."""
