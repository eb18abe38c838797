"""LLM.int8(): outlier columns, vector-wise int8 with decomposition (reference path).

Pure PyTorch, bitsandbytes' names and semantics (Dettmers et al. 2022, §3; ``docs/protocols.md``):

* an element is an outlier when ``|x| >= threshold``; its column is an outlier
  column; ``threshold == 0`` means no decomposition;
* ``row_stats`` (absmax per row of X) leaves the outlier elements out;
* the int8 copy of X has its outlier columns zeroed, so they reach the output
  only through the floating-point product ``X[:, O] @ W[:, O].T``;
* dequantization is ``C_i32 * row_stats[i] * col_stats[j] / 127² + bias[j]``.

These functions are the reference every fast path (the fused CPU kernels in
``outliers.quant.cpu_kernels``, the Numba CUDA kernels) is tested against. None mutates its input.
"""

from __future__ import annotations

import torch

from outliers.errors import InvalidArgumentError
from outliers.quant.quantizers import absmax_matmul_dequant, int8_matmul

__all__ = [
    "outlier_columns",
    "int8_vectorwise_quant",
    "int8_vectorwise_dequant",
    "int8_mm_dequant",
    "llm_int8_matmul",
    "check_threshold",
]


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` as float; raise InvalidArgumentError when negative or not finite."""
    t = float(threshold)
    if not t >= 0 or t == float("inf"):
        raise InvalidArgumentError(f"threshold must be >= 0 and finite, got {threshold!r}")
    return t


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return the sorted int64 indices of columns of ``x (tokens, features)`` with any ``|x| >= threshold``.

    ``threshold == 0`` returns an empty index (no decomposition).
    """
    t = check_threshold(threshold)
    if t == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero((x.abs() >= t).any(0)).view(-1)


def int8_vectorwise_quant(
    x: torch.Tensor, threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return ``(codes int8, row_stats float32, outlier_cols)`` as bitsandbytes does.

    Args:
        x: ``(rows, features)`` float tensor (fp32, fp16 or bf16). Statistics are
            taken in ``x``'s own dtype (as bitsandbytes does), codes in float32.
        threshold: ``|x| >= threshold`` marks outliers; 0 disables.

    Returns:
        codes: ``round(x * 127 / row_stats)``, outlier columns set to 0.
        row_stats: per-row absmax over the non-outlier elements.
        outlier_cols: int64 indices (empty if none); None when ``threshold == 0``.

    A row whose non-outlier elements are all zero gets row_stats 0 and codes 0.
    """
    t = check_threshold(threshold)
    absx = x.abs()
    cols = None
    if t > 0:
        mask = absx >= t
        cols = torch.nonzero(mask.any(0)).view(-1)
        absx = absx.masked_fill(mask, 0)
    row_stats = absx.amax(1).float()
    # 127.0 / row_stats is evaluated by torch as reciprocal(row_stats) * 127:
    # the same expression keeps the codes bit-identical to bitsandbytes'.
    scale = torch.where(row_stats > 0, 127.0 / row_stats, torch.zeros_like(row_stats))
    codes = torch.round(x * scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    if cols is not None and cols.numel():
        codes[:, cols] = 0
    return codes, row_stats, cols


def int8_vectorwise_dequant(codes: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """Return float32 ``codes * stats[:, None] / 127`` (rows of X, or weight output channels)."""
    return codes.float() * (stats.unsqueeze(1) / 127.0)


def int8_mm_dequant(
    c: torch.Tensor, row_stats: torch.Tensor, col_stats: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Return float32 ``c * row_stats[:, None] * col_stats[None, :] / 127² + bias``.

    Raises:
        ValueError: ``c`` is not int32, or the statistics do not fit its shape.
    """
    if c.dtype != torch.int32:
        raise ValueError(f"c must be int32, got {c.dtype}")
    if row_stats.shape != (c.shape[0],) or col_stats.shape != (c.shape[1],):
        raise ValueError(
            f"stats of shapes {tuple(row_stats.shape)}, {tuple(col_stats.shape)} do not fit c of shape {tuple(c.shape)}"
        )
    return absmax_matmul_dequant(c, row_stats, col_stats, bias)


def llm_int8_matmul(
    x: torch.Tensor,
    cb: torch.Tensor,
    scb: torch.Tensor,
    threshold: float,
    bias: torch.Tensor | None = None,
    outlier_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, outlier_cols)``: LLM.int8() of ``x @ W.T`` in float32.

    Args:
        x: ``(tokens, in)`` float.
        cb, scb: the int8 weight ``(out, in)`` and its per-output-channel absmax ``(out,)``.
        threshold: decomposition threshold; 0 is plain vector-wise int8.
        bias: ``(out,)`` or None.
        outlier_weight: float weight ``(out, in)`` to take the outlier columns
            from (the paper); None dequantizes them from ``cb`` (bitsandbytes).
    """
    codes, row_stats, cols = int8_vectorwise_quant(x, threshold)
    out = int8_mm_dequant(int8_matmul(codes, cb), row_stats, scb, bias)
    if cols is None:
        cols = torch.empty(0, dtype=torch.long, device=x.device)
    if cols.numel():
        w_cols = (
            outlier_weight[:, cols].float() if outlier_weight is not None else int8_vectorwise_dequant(cb[:, cols], scb)
        )
        out.addmm_(x[:, cols].float(), w_cols.t())
    return out, cols
