"""Weight outliers: per-layer statistics of the weights ``quantize_model`` would quantize, and their int8 error.

LLM.int8() (Dettmers et al. 2022, arXiv 2208.07339) finds its outliers in the
activations; this is the weights' side, for every linear that
``outliers.quant.model.quantize_model`` replaces (``nn.Linear`` / ``Conv1D``
outside the architecture's ``skip``): the largest |w| and where it is, std,
Pearson kurtosis (normal = 3), the share beyond 6 σ, and ``‖W − Ŵ‖_F / ‖W‖_F``
and ``max |W − Ŵ|`` of three int8 reconstructions by ``outliers.quant.quantizers``:
``absmax`` and ``zeropoint`` (one statistic per tensor) and ``absmax-channel``
(one absmax per output channel, a row of W stored ``(out, in)``: vector-wise
quantization's weight half; ``METHODS``' "absmax-row" is X row-wise, hence
the other name). Layers are read one at a time; moments are taken in float64
on one copy of the layer, centred and squared in place; errors in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.arch.linear import is_linear, weight_of
from outliers.arch.registry import Architecture, architecture_of, is_skipped
from outliers.display import named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.quant.quantizers import dequantize_absmax, dequantize_zeropoint, quantize_absmax, quantize_zeropoint

__all__ = [
    "WEIGHT_METHODS",
    "N_CODES",
    "WeightStats",
    "WeightHistogram",
    "quantizable_linears",
    "kurtosis",
    "reconstruct",
    "weight_stats",
    "weight_histogram",
]

SIGMAS = 6.0  # |w - mean| > 6 std counts as an outlier weight


def _absmax(w: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    q, absmax = quantize_absmax(w, dim)
    return dequantize_absmax(q, absmax, dim), q


def _zeropoint(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale, zero = quantize_zeropoint(w)
    return dequantize_zeropoint(q, scale, zero), q


# method -> W (out, in) -> (Ŵ float32 (out, in), its int8 codes); N_CODES: the codes each can use
WEIGHT_METHODS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "absmax": _absmax,
    "zeropoint": _zeropoint,
    "absmax-channel": partial(_absmax, dim=-1),
}
N_CODES = {"absmax": 255, "zeropoint": 256, "absmax-channel": 255}


def reconstruct(w: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(Ŵ, q)``: float32 ``(out, in)`` and the int8 codes of ``w`` by a ``WEIGHT_METHODS`` method.

    Raises:
        InvalidArgumentError: an unknown method.
    """
    if method not in WEIGHT_METHODS:
        raise InvalidArgumentError(f"unknown weight method {method!r}; choose from {', '.join(WEIGHT_METHODS)}")
    return WEIGHT_METHODS[method](w)


def _column(method: str) -> str:
    return method.replace("-", "_")


_COLUMNS = [
    *("name", "block", "kind", "role", "out_features", "in_features", "numel", "max_abs", "row", "col"),
    *("mean", "std", "kurtosis", "n_beyond_6sigma", "beyond_6sigma"),
    *(f"{e}_{_column(m)}" for m in WEIGHT_METHODS for e in ("rel_err", "max_err")),
]


@dataclass(frozen=True)
class WeightStats:
    """One row per quantizable linear layer (``layers``), what was skipped, and the model facts (``meta``).

    ``layers``: name, block (None outside blocks), kind (the path inside the
    block, e.g. ``self_attn.q_proj``), role (the registry's ``attn_in``,
    ``attn_out``, ``ffn_in``, ``down``, or ``other``), out_features,
    in_features, numel, max_abs and its row, col in W ``(out, in)``, mean,
    std, kurtosis, n_beyond_6sigma, beyond_6sigma (share), and per method
    ``rel_err_<m>`` and ``max_err_<m>`` (``m`` with ``_`` for ``-``).
    """

    layers: pd.DataFrame
    skipped: list[str]
    methods: tuple[str, ...] = tuple(WEIGHT_METHODS)
    meta: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        return weights_html(self)

    def top(self, column: str, n: int = 10) -> pd.DataFrame:
        """The ``n`` layers with the largest ``column``."""
        return self.layers.sort_values(column, ascending=False, kind="stable").head(n)

    def summary(self) -> dict[str, Any]:
        """Over layers: the largest |w| and kurtosis and where, mean kurtosis, the pooled share beyond 6 σ,
        and per method the mean and largest relative error and the largest absolute error."""
        df = self.layers
        if not len(df):
            return {"n_layers": 0}
        # df["kurtosis"], not df.kurtosis: that is DataFrame's method
        big, peaked = df.loc[df["max_abs"].idxmax()], df.loc[df["kurtosis"].idxmax()]
        n_out, numel = int(df["n_beyond_6sigma"].sum()), int(df["numel"].sum())
        out: dict[str, Any] = {
            "n_layers": len(df),
            "n_weights": numel,
            "max_abs": float(big["max_abs"]),
            "max_abs_layer": big["name"],
            "max_kurtosis": float(peaked["kurtosis"]),
            "max_kurtosis_layer": peaked["name"],
            "mean_kurtosis": float(df["kurtosis"].mean()),
            "median_kurtosis": float(df["kurtosis"].median()),
            "n_beyond_6sigma": n_out,
            "beyond_6sigma": n_out / numel,
            "layers_beyond_6sigma": int((df["n_beyond_6sigma"] > 0).sum()),
        }
        for c in map(_column, self.methods):
            rel = df[f"rel_err_{c}"]
            out |= {f"mean_rel_err_{c}": float(rel.mean()), f"max_rel_err_{c}": float(rel.max())}
            out |= {f"max_rel_err_{c}_layer": df["name"][rel.idxmax()], f"max_err_{c}": float(df[f"max_err_{c}"].max())}
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON (the table as a list of records, None for a missing block), ``meta`` first."""
        rows = self.layers.astype(object).where(self.layers.notna(), None).to_dict(orient="records")
        facts = {"methods": list(self.methods), "skipped": list(self.skipped), "summary": self.summary()}
        return self.meta | facts | {"layers": rows}


@dataclass(frozen=True)
class WeightHistogram:
    """Counts of one layer's weights and of their int8 reconstructions over shared, symmetric ``edges``.

    ``counts``: {"original", then each method: ``(bins,)`` int64}; ``codes_used``: how many distinct int8
    codes each method's W uses (of 255 for absmax, 256 for zeropoint); ``rel_err``: ‖W − Ŵ‖_F / ‖W‖_F.
    """

    name: str
    edges: np.ndarray  # (bins + 1,)
    counts: dict[str, np.ndarray]
    codes_used: dict[str, int]
    rel_err: dict[str, float]
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        counts = {k: v.tolist() for k, v in self.counts.items()}
        out = {"layer": self.name, "edges": self.edges.tolist(), "counts": counts}
        return out | {"codes_used": dict(self.codes_used), "rel_err": dict(self.rel_err)}


def _roles(arch: Architecture) -> dict[str, str]:
    """The registry's role of each linear path inside a block: attn_in (q/k/v), attn_out, ffn_in, down."""
    roles = dict.fromkeys(arch.attn_in.linears if arch.attn_in else (), "attn_in")
    roles |= dict.fromkeys(arch.ffn_in.linears if arch.ffn_in else (), "ffn_in")
    return roles | {p: r for p, r in ((arch.attn_out, "attn_out"), (arch.down, "down")) if p}


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return ``(name, module)`` of the linears ``quantize_model`` replaces with its default ``skip``, in order."""
    skip = architecture_of(model).skip
    return [(n, m) for n, m in model.named_modules() if n and is_linear(m) and not is_skipped(n, skip)]


def _where(arch: Architecture, name: str) -> tuple[int | None, str, str]:
    """``(block, kind, role)`` of a linear: its block index, its path inside the block, its registry role."""
    if arch.blocks is not None and (m := re.search(r"(?:^|\.)" + arch.blocks + r"\.", name)):
        kind = name[m.end() :]
        return int(m.group(1)), kind, _roles(arch).get(kind, "other")
    return None, name, "other"


def _moments(w64: torch.Tensor, sigmas: float = SIGMAS) -> tuple[float, float, float, int]:
    """``(mean, variance, Pearson kurtosis, values with |x − mean| > sigmas·std)`` of a float64 tensor.

    Consumes ``w64``: it is centred and squared in place, so no second copy is made.
    """
    mean = float(w64.mean())
    w64.sub_(mean).square_()  # (x - mean)²
    var = float(w64.mean())
    if not var > 0:
        return mean, 0.0, math.nan, 0
    m4 = float(torch.linalg.vector_norm(w64)) ** 2 / w64.numel()  # Σ ((x - mean)²)² / n
    return mean, var, m4 / var**2, int((w64 > sigmas**2 * var).sum())


def kurtosis(x: torch.Tensor) -> float:
    """Return the Pearson kurtosis ``E[(x − μ)⁴] / σ⁴`` of all of ``x`` (population moments, float64).

    Normal: 3; continuous uniform: 1.8; two equally likely values: 1. NaN when ``x`` is constant.
    """
    return _moments(x.detach().to(torch.float64, copy=True))[2]


def _layer_row(w: torch.Tensor) -> dict[str, Any]:
    """The statistics of one weight ``(out, in)``; the layer's only float64 copy lives inside this call."""
    flat = int(w.abs().argmax())  # index in the (out, in) view, also for Conv1D's transposed one
    r, c = divmod(flat, w.shape[1])
    row: dict[str, Any] = {"out_features": w.shape[0], "in_features": w.shape[1], "numel": w.numel()}
    row |= {"max_abs": float(w[r, c].abs()), "row": r, "col": c}
    w32 = w.float()
    norm = float(torch.linalg.vector_norm(w32))
    errs: dict[str, float] = {}
    for method in WEIGHT_METHODS:
        diff = reconstruct(w, method)[0].sub_(w32)  # (out, in) float32
        errs[f"rel_err_{_column(method)}"] = float(torch.linalg.vector_norm(diff)) / norm if norm else 0.0
        errs[f"max_err_{_column(method)}"] = float(diff.abs().max())
    mean, var, kurt, n_out = _moments(w.to(torch.float64, copy=True))
    row |= {"mean": mean, "std": math.sqrt(var), "kurtosis": kurt, "n_beyond_6sigma": n_out}
    return row | {"beyond_6sigma": n_out / w.numel()} | errs


def _select(model: nn.Module, names: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
    found = quantizable_linears(model)
    if names is None:
        return found
    have = dict(found)
    missing = [n for n in names if n not in have]
    if missing:
        sample = ", ".join(n for n, _ in found[:4])
        raise InvalidArgumentError(
            f"not a linear layer quantize_model would replace: {', '.join(missing)} (these are, e.g.: {sample})"
        )
    return [(n, have[n]) for n in names]


@torch.inference_mode()
def weight_stats(
    model: nn.Module,
    *,
    layers: Sequence[str] | None = None,
    progress: bool = False,
    meta: dict[str, Any] | None = None,
) -> WeightStats:
    """Measure every quantizable linear layer's weights (or the ``layers`` named), one layer at a time.

    Raises:
        InvalidArgumentError: a name in ``layers`` that ``quantize_model`` would not replace.
    """
    chosen, arch = _select(model, layers), architecture_of(model)
    skipped = [n for n, m in model.named_modules() if n and is_linear(m) and is_skipped(n, arch.skip)]
    rows = []
    for name, module in tqdm(chosen, desc="weights", unit="layer", disable=not progress, leave=False):
        block, kind, role = _where(arch, name)
        rows.append({"name": name, "block": block, "kind": kind, "role": role, **_layer_row(weight_of(module))})
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df["block"] = df["block"].astype("Int64")  # None outside blocks (GENERIC families, OPT's projections)
    return WeightStats(layers=df, skipped=skipped, meta=dict(meta or {}))


@torch.inference_mode()
def weight_histogram(
    model: nn.Module,
    name: str,
    *,
    bins: int = 512,
    methods: Sequence[str] = ("absmax", "zeropoint"),
    meta: dict[str, Any] | None = None,
) -> WeightHistogram:
    """Histogram one layer's weights and their int8 reconstructions over ``bins`` shared bins in [-m, m].

    ``m`` is the largest |value| among W and the Ŵ's, so zero is the middle edge of an even ``bins``.

    Raises:
        InvalidArgumentError: ``name`` is not a quantizable linear, ``bins`` < 1, an unknown method.
    """
    if bins < 1:
        raise InvalidArgumentError(f"bins must be >= 1, got {bins}")
    ((_, module),) = _select(model, [name])
    w = weight_of(module).float().cpu()
    norm = float(torch.linalg.vector_norm(w))
    series, codes, errs = {"original": w}, {}, {}
    for method in methods:
        w_hat, q = reconstruct(w, method)
        series[method] = w_hat
        codes[method] = int(torch.unique(q).numel())
        errs[method] = float(torch.linalg.vector_norm(w_hat - w)) / norm if norm else 0.0
    m = max(float(s.abs().max()) for s in series.values()) or 1.0
    edges = torch.linspace(-m, m, bins + 1, dtype=torch.float32)
    counts = {k: torch.histogram(s.reshape(-1), bins=edges).hist.to(torch.int64).numpy() for k, s in series.items()}
    return WeightHistogram(name, edges.numpy(), counts, codes, errs, meta=dict(meta or {}))


def weights_html(w: WeightStats) -> str:
    """``WeightStats``: the largest |w| and kurtosis and where, the share beyond 6σ, int8 errors; the layers."""
    s = w.summary()
    rows: list[tuple[Any, ...]] = [
        ("max |w|", s["max_abs"], s["max_abs_layer"]),
        ("max kurtosis", s["max_kurtosis"], f"{s['max_kurtosis_layer']}; mean {s['mean_kurtosis']:.2f}, normal = 3"),
        ("beyond 6σ", s["beyond_6sigma"], f"{s['n_beyond_6sigma']} weights in {s['layers_beyond_6sigma']} layers"),
    ]
    rows += [(f"int8 {m} error", s[f"mean_rel_err_{m}"], "‖W − Ŵ‖/‖W‖, mean") for m in ("absmax", "zeropoint")]
    settings = [("model", w.meta.get("model")), ("layers", s["n_layers"]), *provenance(w.meta)]
    tables = [("layers by kurtosis", w.top("kurtosis", len(w.layers)))]
    return render_html(named("Weight outliers", w.meta.get("model", "")), rows, settings, tables=tables)
