"""``Int8Linear``: a drop-in for ``nn.Linear`` and GPT-2's ``Conv1D`` on real int8 arithmetic.

Methods are the rows of Table 1 of Dettmers et al. 2022, "LLM.int8()" (arXiv 2208.07339),
declared in ``outliers.quant.methods`` (``method_table()`` prints them); the registry's
FP8 and W4A16 rows run on ``outliers.quant.emulated`` instead.

Weights are stored as int8 codes plus float32 statistics (the memory saving
is real). With decomposition, columns of X holding any ``|x| >= threshold`` go
through a float matmul against weight columns dequantized from int8
(``outlier_weights="int8"``, bitsandbytes) or the original float weight
(``"fp"``, the paper; keeps a float copy of the weight).

``round_to="float16"`` rounds X and W to fp16 before quantizing, as
bitsandbytes always does; use it to compare with bitsandbytes on an fp32 model.
It matters more than it sounds: on SmolLM2, nudging the weights by 1e-6
(relative) leaves fp32 perplexity unchanged to 4 decimals but moves llm.int8
perplexity by up to 0.6 %, because rounding boundaries flip; only the same
arithmetic gives the same number. On CPU everything is
computed in float32 (fp16 matmul on CPU is ~100x slower) and ``llm.int8`` /
``absmax-vector`` use fused one-pass kernels; results are cast back to the
input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from outliers.arch.linear import weight_of
from outliers.errors import InvalidArgumentError
from outliers.quant.int8 import check_threshold, int8_mm_dequant, int8_vectorwise_quant
from outliers.quant.methods import Format, Granularity, Scheme, get_method
from outliers.quant.quantizers import (
    absmax_matmul_dequant,
    dequantize_absmax,
    dequantize_zeropoint,
    int8_matmul,
    quantize_absmax,
    quantize_zeropoint,
    zeropoint_matmul_dequant,
)
from outliers.quant.shared_input import QuantizedInput, quantized_input

__all__ = ["Int8Linear", "NonFiniteInputError", "OUTLIER_WEIGHTS", "BACKENDS", "ROUND_TO", "PATHS"]


OUTLIER_WEIGHTS = ("int8", "fp")
BACKENDS = ("auto", "torch", "numba")
ROUND_TO = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Up to FUSED_COLUMNS outlier columns, on at least FUSED_ROWS rows, the CPU path adds their float product
# inside the dequantization pass, summed as MKL's addmm_ sums them there (bit-identical: checked for 16 to
# 2048 rows, 96 to 6144 outputs, 1 to 64 columns). Elsewhere addmm_ itself runs: with more columns (SmolLM2's
# late down projections reach 250-590) it is a real GEMM whose blocked sums no loop here copies, and for a
# few rows (generation) MKL takes other kernels whose order differs again.
FUSED_COLUMNS = 64
FUSED_ROWS = 16
# ... and on at most FUSED_OUTPUTS outputs: the kernel sums a row's outlier product in a buffer of one
# row's outputs, passed over once per column; beyond ~8k floats (32 KB) that buffer leaves the cache and
# every pass streams (an lm_head's 49k-262k outputs ran several times slower than addmm_ itself).
FUSED_OUTPUTS = 8192


_Computed = tuple[torch.Tensor, torch.Tensor]  # a path's output (outlier product added) and X's outlier columns


class NonFiniteInputError(InvalidArgumentError):
    """NaN or inf reached an Int8Linear (absmax would silently turn the row into zeros)."""


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored in int8; see the module docstring for methods."""

    # buffers (declared for the type checker: nn.Module's attribute lookup would say Tensor | Module)
    weight_q: torch.Tensor  # int8 codes, (out, in)
    weight_scale: torch.Tensor  # float32 absmax or zeropoint scale, per output channel or one
    weight_zero: torch.Tensor | None  # int32 zero points (zeropoint methods)
    bias: torch.Tensor | None
    weight_fp: torch.Tensor | None  # the float weight, for outlier_weights="fp"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str = "llm.int8",
        *,
        threshold: float = 6.0,
        bias: bool = True,
        outlier_weights: str = "int8",
        name: str = "",
        round_to: str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.spec = get_method(method)
        if self.spec.format is not Format.INT8:
            raise InvalidArgumentError(
                f"Int8Linear runs int8 methods; {method!r} is {self.spec.format} "
                "(outliers.quant.emulated; quantize_model picks the layer)"
            )
        if outlier_weights not in OUTLIER_WEIGHTS:
            raise InvalidArgumentError(f"outlier_weights must be one of {OUTLIER_WEIGHTS}, got {outlier_weights!r}")
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        if round_to not in ROUND_TO:
            raise InvalidArgumentError(f"round_to must be one of {list(ROUND_TO)}, got {round_to!r}")
        t = check_threshold(threshold)
        self.round_to = round_to
        self.in_features, self.out_features = in_features, out_features
        self.method = method
        self.threshold = t if self.spec.decomposition else 0.0
        self.outlier_weights = outlier_weights
        self.name = name  # the module's path in its model, for error messages
        # where each call reports its outlier columns (n, in_features) while outliers.quant.decomposed counts
        self.count_float_columns: Callable[[int, int], None] | None = None
        self._paths: dict[tuple[str, torch.dtype], Callable[..., _Computed]] = {}  # PATHS' entry per device, dtype
        n_stats = out_features if self.spec.weights is Granularity.CHANNEL else 1
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(n_stats, dtype=torch.float32))
        if self.spec.scheme is Scheme.ZEROPOINT:
            self.register_buffer("weight_zero", torch.zeros(n_stats, dtype=torch.int32))
        else:
            self.weight_zero = None
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        needs_fp = self.spec.decomposition and outlier_weights == "fp"
        self.register_buffer("weight_fp", torch.zeros(out_features, in_features) if needs_fp else None)

    @classmethod
    def from_linear(
        cls,
        module: nn.Module,
        method: str = "llm.int8",
        *,
        threshold: float = 6.0,
        outlier_weights: str = "int8",
        name: str = "",
        round_to: str | None = None,
        backend: str = "auto",
    ) -> Int8Linear:
        """Return an Int8Linear quantized from an ``nn.Linear`` or ``Conv1D``."""
        w = weight_of(module)
        out_f, in_f = w.shape
        bias = getattr(module, "bias", None)
        q = cls(
            in_f,
            out_f,
            method,
            threshold=threshold,
            bias=bias is not None,
            outlier_weights=outlier_weights,
            name=name,
            round_to=round_to,
            backend=backend,
        ).to(w.device)
        spec = q.spec
        w_fp = w
        if round_to:
            w = w.to(ROUND_TO[round_to])
        if spec.scheme is Scheme.ABSMAX:
            if spec.weights is Granularity.TENSOR:
                codes, stats = quantize_absmax(w)
            elif w.device.type == "cpu" and w.dtype == torch.float32:
                # per output channel in one Numba pass, bit-identical to int8_vectorwise_quant(W, 0.0)
                # (tests/quant/test_int8.py); a study quantizes every linear once per cell
                from outliers.quant.cpu_kernels import quantize_rows

                codes, stats, _ = quantize_rows(w.detach().contiguous(), 0.0)
            else:  # per output channel, as bitsandbytes' int8_vectorwise_quant(W)
                codes, stats, _ = int8_vectorwise_quant(w, 0.0)
            q.weight_q.copy_(codes)
            q.weight_scale.copy_(stats.reshape(-1))
        else:
            codes, scale, zero = quantize_zeropoint(w, spec.w_dim)
            q.weight_q.copy_(codes)
            q.weight_scale.copy_(scale.reshape(-1))
            assert q.weight_zero is not None  # registered for zeropoint methods
            q.weight_zero.copy_(zero.reshape(-1))
        if bias is not None:
            q.bias = bias.detach().clone()
        if q.weight_fp is not None:
            q.weight_fp = w_fp.clone()
        return q

    # ---------------------------------------------------------------- forward

    def _w_stats(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight's scale and zero point as the quantizer functions take them (0-dim when tensor-wise)."""
        tensor_wise = self.spec.w_dim is None
        zero = self.weight_zero
        if zero is not None and tensor_wise:
            zero = zero[0]
        return (self.weight_scale[0] if tensor_wise else self.weight_scale), zero

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        scale, zero = self._w_stats()
        if self.spec.scheme is Scheme.ABSMAX:
            return dequantize_absmax(codes, scale, self.spec.w_dim)
        assert zero is not None  # zeropoint methods register weight_zero
        return dequantize_zeropoint(codes, scale, zero, self.spec.w_dim)

    def dequantized_weight(self) -> torch.Tensor:
        """Return the float32 weight ``(out, in)`` that the int8 codes stand for."""
        return self._dequantize(self.weight_q)

    def _check_finite(self, stats: torch.Tensor, x_cols: torch.Tensor, x: torch.Tensor) -> None:
        # NaN propagates into the row statistics; inf passes |x| >= t and lands in an outlier
        # column, so checking those two small tensors (stats, and x's outlier columns) covers every case.
        # Any NaN or inf makes a sum NaN or inf, and one sum costs a twentieth of isfinite's mask; only a
        # sum that overflowed on finite values needs the mask to tell.
        cols_ok = not x_cols.numel() or bool(x_cols.sum().isfinite()) or bool(torch.isfinite(x_cols).all())
        if not cols_ok or not bool(torch.isfinite(stats).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise NonFiniteInputError(
                f"{bad} NaN/inf value(s) in the input of {self.name or 'Int8Linear'} "
                f"({self.method}); int8 quantization would hide them"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.dtype.is_floating_point:
            raise InvalidArgumentError(f"{self.name or 'Int8Linear'} expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise InvalidArgumentError(
                f"{self.name or 'Int8Linear'} expects inputs with {self.in_features} "
                f"features, got shape {tuple(x.shape)}"
            )
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type == "cpu" or x2.dtype == torch.float64:
            x2 = x2.float()  # never fp16 compute on CPU
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        out = self._forward_2d(x2, source=x)
        return out.to(dtype).reshape(*lead, self.out_features)

    def _rounded(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as it is quantized: rounded to ``round_to`` first where asked (bitsandbytes' arithmetic)."""
        return x.to(ROUND_TO[self.round_to]).to(x.dtype) if self.round_to else x

    def _quantized_input(self, x: torch.Tensor, source: torch.Tensor) -> QuantizedInput:
        """X's codes, row statistics and outlier columns; computed once for siblings reading ``source``."""

        def compute() -> QuantizedInput:
            xq = self._rounded(x)
            if x.device.type == "cpu" and x.dtype == torch.float32:
                from outliers.quant.cpu_kernels import quantize_decompose

                codes, stats, cols, x_cols = quantize_decompose(xq, self.threshold, x)
            else:
                codes, stats, maybe_cols = int8_vectorwise_quant(xq, self.threshold)
                cols = torch.empty(0, dtype=torch.long, device=x.device) if maybe_cols is None else maybe_cols
                x_cols = x[:, cols]
            self._check_finite(stats, x_cols, x)
            return QuantizedInput(codes, stats, cols, x_cols)

        return quantized_input(source, ("vector-wise int8", self.threshold, self.round_to), compute)

    def _forward_2d(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x``: the 2-d float input; ``source``: the tensor the layer was called with (shared by siblings)."""
        key = (x.device.type, x.dtype)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = PATHS[self._choose(x)]
        bias = None if self.bias is None else self.bias.float()
        out, cols = path(self, x, source, bias)
        if self.count_float_columns is not None:  # outliers.quant.decomposed.float_columns is counting
            self.count_float_columns(cols.numel(), self.in_features)
        return out

    def _choose(self, x: torch.Tensor) -> str:
        """Which ``PATHS`` entry computes this layer on inputs like ``x``: decided once per device and dtype."""
        spec = self.spec
        vectorwise = (
            spec.scheme is Scheme.ABSMAX and spec.activations is Granularity.ROW and spec.weights is Granularity.CHANNEL
        )
        if not vectorwise:
            return "generic"
        if self._numba(x):
            return "numba-cuda"
        return "cpu-fused" if x.device.type == "cpu" and x.dtype == torch.float32 else "torch"

    def _vectorwise_numba(self, x: torch.Tensor, source: torch.Tensor, bias: torch.Tensor | None) -> _Computed:
        """llm.int8 / absmax-vector on the Numba CUDA kernels: the epilogue adds the outlier product."""
        from cuda_kernels.errors import KernelArgumentError
        from cuda_kernels.launch import llm_int8_linear

        try:
            out, cols, stats = llm_int8_linear(
                self._rounded(x),
                self.weight_q,
                self.weight_scale,
                bias,
                self.threshold,
                x_float=x,
                outlier_weight=self.weight_fp,
                out_dtype=x.dtype,
            )
        except KernelArgumentError as e:  # e.g. weights left on the CPU: say which layer, as ours
            raise InvalidArgumentError(f"{self.name or 'Int8Linear'}: {e}") from e
        self._check_finite(stats, x[:, cols], x)
        return out, cols

    def _vectorwise_cpu(self, x: torch.Tensor, source: torch.Tensor, bias: torch.Tensor | None) -> _Computed:
        """llm.int8 / absmax-vector on a float32 CPU input: fused Numba passes, the exact int8 GEMM between."""
        from outliers.quant.cpu_kernels import dequantize_inplace

        q = self._quantized_input(x, source)
        cols, x_cols = q.cols, q.x_cols
        outliers = None
        fused = len(x) >= FUSED_ROWS and self.out_features <= FUSED_OUTPUTS
        if fused and 0 < cols.numel() <= FUSED_COLUMNS:  # joins the dequantization pass
            outliers = (x_cols, self._outlier_weight(cols).t())
        product = int8_matmul(q.codes, self.weight_q)
        out = dequantize_inplace(product, q.stats, self.weight_scale, bias, outliers)
        if outliers is None:
            self._add_outliers(out, x_cols, cols)
        return out, cols

    def _vectorwise_torch(self, x: torch.Tensor, source: torch.Tensor, bias: torch.Tensor | None) -> _Computed:
        """llm.int8 / absmax-vector in torch ops (CUDA without the kernels, or a half / double CPU input)."""
        q = self._quantized_input(x, source)
        out = int8_mm_dequant(int8_matmul(q.codes, self.weight_q), q.stats, self.weight_scale, bias)
        self._add_outliers(out, q.x_cols, q.cols)
        return out, q.cols

    def _generic(self, x: torch.Tensor, source: torch.Tensor, bias: torch.Tensor | None) -> _Computed:
        """Every other int8 method: tensor-wise or zeropoint, with or without decomposition."""
        out, cols = self._forward_generic(self._rounded(x), bias)
        self._add_outliers(out, x[:, cols], cols)
        return out, cols

    def _add_outliers(self, out: torch.Tensor, x_cols: torch.Tensor, cols: torch.Tensor) -> None:
        if cols.numel():
            # out is float32; a half x (CUDA, torch backend) must meet it there, as the Numba epilogue does
            out.addmm_(x_cols.to(out.dtype), self._outlier_weight(cols).to(out.dtype).t())

    def _outlier_weight(self, cols: torch.Tensor) -> torch.Tensor:
        """The weight's outlier columns ``(out, k)`` in float: the paper's float weight, or dequantized int8."""
        return self.weight_fp[:, cols] if self.weight_fp is not None else self._dequantized_cols(cols)

    def _numba(self, x: torch.Tensor) -> bool:
        """Whether this call runs on the Numba CUDA kernels (llm.int8 and absmax-vector only)."""
        if self.backend == "torch" or (self.backend == "auto" and not x.is_cuda):
            return False  # decided without importing numba.cuda: the CPU hot path stays lean
        from cuda_kernels.device import available, simulated

        if self.backend == "numba":
            if not (x.is_cuda or simulated()):
                raise InvalidArgumentError(
                    f"{self.name or 'Int8Linear'}: backend='numba' needs CUDA tensors "
                    "(or NUMBA_ENABLE_CUDASIM=1 to simulate); got a tensor on "
                    f"{x.device}. Use backend='torch' or 'auto' on CPU"
                )
            return True
        return x.is_cuda and available()

    def _dequantized_cols(self, cols: torch.Tensor) -> torch.Tensor:
        return self._dequantize(self.weight_q[:, cols])

    def _forward_generic(self, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        spec, t = self.spec, self.threshold
        cols = torch.empty(0, dtype=torch.long, device=x.device)
        xs = x
        if spec.decomposition and t > 0:
            mask = x.abs() >= t
            cols = torch.nonzero(mask.any(0)).view(-1)
            xs = x.masked_fill(mask, 0)  # statistics without the outlier elements
            if cols.numel():
                xs[:, cols] = 0  # their columns go through the float path only
        w_scale, w_zero = self._w_stats()
        if spec.scheme is Scheme.ABSMAX:
            codes, stats = quantize_absmax(xs, spec.x_dim)
            self._check_finite(stats, x[:, cols], x)
            out = absmax_matmul_dequant(int8_matmul(codes, self.weight_q), stats, w_scale, bias)
        else:
            codes, scale, zero = quantize_zeropoint(xs, spec.x_dim)
            self._check_finite(scale, x[:, cols], x)
            assert w_zero is not None  # zeropoint methods register weight_zero
            out = zeropoint_matmul_dequant(codes, scale, zero, self.weight_q, w_scale, w_zero, bias)
        return out, cols

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}, method={self.method!r}"
        if self.spec.decomposition:
            s += f", threshold={self.threshold}, outlier_weights={self.outlier_weights!r}"
        if self.round_to:
            s += f", round_to={self.round_to!r}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s + f", bias={self.bias is not None}"


# How an Int8Linear computes, chosen once per (device, dtype) by Int8Linear._choose. The CPU int8 product
# under each is outliers.quant.gemm's backend table (int8_matmul).
PATHS: dict[str, Callable[..., _Computed]] = {
    "numba-cuda": Int8Linear._vectorwise_numba,
    "cpu-fused": Int8Linear._vectorwise_cpu,
    "torch": Int8Linear._vectorwise_torch,
    "generic": Int8Linear._generic,
}
