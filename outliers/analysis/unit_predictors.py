"""Cheap predictors of a unit's sensitivity, measured on calibration text in one float forward.

Per quantized linear (its input X, its float weight W, the method's
dequantized weight Ŵ and the quantized layer q):

``input_max``        max |X|
``input_crest``      max |X| / rms(X): what a per-tensor scale has to cover
``token_kurtosis``   Pearson's kurtosis of each token's values across dims, averaged (Bondarenko et al. 2023)
``weight_kurtosis``  Pearson's kurtosis of W's entries
``weight_error``     ‖W − Ŵ‖ / ‖W‖: the weight's reconstruction error alone
``output_error``     ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖: the same error as the layer's output sees it
``imatrix_error``    Σ_j c_j Σ_i (W − Ŵ)_ij² / Σ_j c_j Σ_i W_ij², c_j = Σ_t x_tj² (llama.cpp's imatrix weighting)
``layer_error``      ‖q(X) − (XWᵀ + b)‖ / ‖XWᵀ + b‖: the quantized layer itself, activations quantized too

A unit's value pools its linears: errors as the root of summed squares over
summed squares, ``input_max``/``input_crest``/``weight_kurtosis`` as the
largest, ``token_kurtosis`` as the mean. Only ``layer_error`` sees what a
method does to activations; the weight-only ones cannot tell W8A8 methods
apart from each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from outliers.arch.hooks import pre_hooks
from outliers.arch.linear import weight_of
from outliers.arch.lmhead import run_for_hooks
from outliers.models.dispatch import input_device

__all__ = ["PREDICTORS", "unit_predictors"]

PREDICTORS = (
    "input_max",
    "input_crest",
    "token_kurtosis",
    "weight_kurtosis",
    "weight_error",
    "output_error",
    "imatrix_error",
    "layer_error",
)


@dataclass
class _Acc:
    """Running sums for one linear over the calibration tokens."""

    max_abs: float = 0.0
    sq: float = 0.0
    n: int = 0
    kurt: float = 0.0
    rows: int = 0
    col_sq: torch.Tensor | None = None
    out_sq: float = 0.0
    out_err: float = 0.0
    layer_ref: float = 0.0
    layer_err: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Pearson's kurtosis along the last axis (a normal distribution has 3)."""
    c = x - x.mean(-1, keepdim=True)
    m2 = c.pow(2).mean(-1)
    return c.pow(4).mean(-1) / m2.pow(2).clamp_min(1e-30)


def _observe(acc: _Acc, x: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, bias, q: nn.Module) -> None:
    x2 = x.reshape(-1, x.shape[-1]).float()
    acc.max_abs = max(acc.max_abs, float(x2.abs().max()))
    acc.sq += float(x2.double().pow(2).sum())
    acc.n += x2.numel()
    acc.kurt += float(_kurtosis(x2).double().sum())
    acc.rows += x2.shape[0]
    cs = x2.double().pow(2).sum(0)
    acc.col_sq = cs if acc.col_sq is None else acc.col_sq + cs
    y = x2 @ w.T
    acc.out_sq += float(y.double().pow(2).sum())
    acc.out_err += float((x2 @ dw.T).double().pow(2).sum())
    full = y if bias is None else y + bias.float()
    yq = q(x).reshape(full.shape).float()
    acc.layer_ref += float(full.double().pow(2).sum())
    acc.layer_err += float((yq - full).double().pow(2).sum())


@torch.no_grad()
def unit_predictors(
    base: nn.Module, quantized: nn.Module, units: list, calib: torch.Tensor, *, batch_size: int = 4
) -> dict[str, dict[str, float]]:
    """Return ``{unit name: {predictor: value}}`` measured on the calibration windows ``calib`` (n, window).

    ``base`` is the float model the method quantized (after any transform) and ``quantized`` its quantized
    copy; both are left as they were.
    """
    names = [m for u in units for m in u.modules]
    float_modules = dict(base.named_modules())
    q_modules = dict(quantized.named_modules())
    weights = {}
    for name in names:
        w = weight_of(float_modules[name]).float()
        w_hat = q_modules[name].dequantized_weight().float().reshape(w.shape)
        weights[name] = (w, w - w_hat, getattr(float_modules[name], "bias", None))
    acc = {name: _Acc() for name in names}

    def hook(name: str, module: nn.Module, args: tuple) -> None:
        w, dw, bias = weights[name]
        _observe(acc[name], args[0], w, dw, bias, q_modules[name])

    device = input_device(base)
    with pre_hooks(base, names, hook):
        for start in range(0, len(calib), batch_size):
            run_for_hooks(base, calib[start : start + batch_size].to(device))

    out: dict[str, dict[str, float]] = {}
    for u in units:
        a = [acc[m] for m in u.modules]
        ws = [weights[m] for m in u.modules]
        pairs = list(zip(a, ws, strict=True))
        imatrix_num = sum(_weighted(x, dw) for x, (_, dw, _) in pairs)
        imatrix_den = sum(_weighted(x, ww) for x, (ww, _, _) in pairs)
        out[u.name] = {
            "input_max": max(x.max_abs for x in a),
            "input_crest": max(x.max_abs / max((x.sq / x.n) ** 0.5, 1e-30) for x in a),
            "token_kurtosis": sum(x.kurt / x.rows for x in a) / len(a),
            "weight_kurtosis": max(float(_kurtosis(ww.reshape(1, -1))) for ww, _, _ in ws),
            "weight_error": _ratio(
                sum(float(dw.double().pow(2).sum()) for _, dw, _ in ws),
                sum(float(ww.double().pow(2).sum()) for ww, _, _ in ws),
            ),
            "output_error": _ratio(sum(x.out_err for x in a), sum(x.out_sq for x in a)),
            "imatrix_error": _ratio(imatrix_num, imatrix_den),
            "layer_error": _ratio(sum(x.layer_err for x in a), sum(x.layer_ref for x in a)),
        }
    return out


def _weighted(acc: _Acc, w: torch.Tensor) -> float:
    """Σ_j c_j Σ_i w_ij², c_j = Σ_t x_tj²: squared weights by how much input their column sees."""
    assert acc.col_sq is not None  # every hooked linear ran on the calibration windows
    return float((acc.col_sq * w.double().pow(2).sum(0)).sum())


def _ratio(err_sq: float, ref_sq: float) -> float:
    return (err_sq / ref_sq) ** 0.5 if ref_sq > 0 else float("nan")
