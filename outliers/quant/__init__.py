"""Stage 4, quantization on real integer arithmetic.

``methods``      the method registry: one frozen record per Table-1 row
``quantizers``   absmax and zeropoint as pure functions, exact int8 matmul
``int8``         LLM.int8()'s decomposition, the reference every fast path is tested against
``cpu_kernels``  fused one-pass Numba kernels for the CPU hot path
``linear``       ``Int8Linear``, a drop-in for nn.Linear and Conv1D
``emulated``     ``FP8Linear`` (E4M3, emulated on CPU) and ``W4A16Linear`` (int4 weights, RTN g128)
``mx``           microscaling (OCP MX) and NVFP4 formats: exact element rounding, block scales, ``MXLinear``
``model``        whole-model quantize, quantized copy, save and load
``transforms``   what removes outliers before quantizing: SmoothQuant smoothing, Hadamard rotation
``hadamard``     Hadamard matrices of the models' sizes (Sylvester, Paley I/II, Kronecker products)
``calibration``  calibration windows apart from evaluation, activation maxima, a transformed copy
``static``       static W8A8: per-tensor activation scales fixed offline (min-max, exact percentiles)
``prefix``       outlier tokens (Sun et al.; PrefixQuant) and PrefixQuant's prefix chosen from them
The CUDA backend is the standalone ``cuda_kernels`` package.
"""
