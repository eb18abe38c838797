"""Numba CUDA kernels for LLM.int8(): outlier columns, vector-wise quantization,
int8 GEMM with fused dequantization, outlier-column gathers.

``kernels`` holds the ``@cuda.jit`` bodies, ``launch`` the launchers that take
torch tensors. Importing this package needs no GPU; run the kernels on CPU
with ``NUMBA_ENABLE_CUDASIM=1`` (set before numba is imported).
"""
