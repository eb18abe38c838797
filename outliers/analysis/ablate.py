"""The paper's removal experiment (§4): zero or mean-fill feature dims at capture inputs.

Zeroing the outlier dims before the attention projections, against the same
number of random dims over several seeded draws, shows how much the model
leans on them: perplexity and the mean top-1 attention probability move a lot
for outlier dims and barely for random ones.

The hooks edit the input of *every* module that reads the capture point's
tensor (q, k and v share the attention input; gate and up the FFN input), so
the model sees the ablated hidden state consistently.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.points import CapturePoint, resolve_points
from outliers.analysis.stats import OutlierStats, Stat
from outliers.arch.registry import GENERIC, architecture_of
from outliers.errors import InvalidArgumentError
from outliers.eval.perplexity import PerplexitySettings, perplexity
from outliers.models.dispatch import input_device

__all__ = ["readers", "ablate_dims", "mean_top1_attention", "ablation_study"]


def readers(model: nn.Module, point: CapturePoint) -> list[str]:
    """Return the module names that read ``point``'s input (the point's own module first).

    q/k/v share the attention input and up/gate the FFN input: the
    architecture registry says which (``SharedInput``).
    """
    family = architecture_of(model)
    if family is GENERIC and point.kind in ("attn_in", "ffn_in"):
        warnings.warn(
            f"{type(model).__name__} is not in the architecture registry: only {point.module} is edited, "
            "not the other linears that may read the same input; register its family (outliers.arch)",
            stacklevel=3,
        )
    shared = {"attn_in": family.attn_in, "ffn_in": family.ffn_in}.get(point.kind)
    if shared is None or not point.module.endswith(shared.linears[0]):
        return [point.module]
    block = point.module[: -len(shared.linears[0])]
    names = dict(model.named_modules())
    return [point.module, *(block + lin for lin in shared.linears[1:] if block + lin in names)]


@contextmanager
def ablate_dims(
    model: nn.Module,
    points: list[CapturePoint],
    dims: list[int],
    mode: str = "zero",
    means: dict[str, torch.Tensor] | None = None,
) -> Iterator[None]:
    """Zero (or set to their mean) ``dims`` of the inputs at ``points`` while the block runs.

    Raises:
        InvalidArgumentError: unknown mode, dims out of range, or ``mode="mean"`` without ``means``.
    """
    if mode not in ("zero", "mean"):
        raise InvalidArgumentError(f"mode must be 'zero' or 'mean', got {mode!r}")
    if mode == "mean" and means is None:
        raise InvalidArgumentError("mode='mean' needs per-point means (from a scan's statistics)")
    for p in points:
        bad = [d for d in dims if not 0 <= d < p.dims]
        if bad:
            raise InvalidArgumentError(f"dims {bad} out of range for {p.name} ({p.dims} dims)")
    idx = torch.tensor(sorted(set(dims)), dtype=torch.long)
    modules = dict(model.named_modules())
    handles = []

    def hook(mod, args, point):
        x = args[0].clone()
        fill = 0.0 if mode == "zero" else means[point.name].to(x.device, x.dtype)[idx.to(x.device)]
        x[..., idx.to(x.device)] = fill
        return (x, *args[1:])

    try:
        for p in points:
            if p.kind == "residual":
                raise InvalidArgumentError("ablation edits layer inputs; residual points are not supported")
            for name in readers(model, p):
                handles.append(modules[name].register_forward_pre_hook(lambda m, a, p=p: hook(m, a, p)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def mean_top1_attention(model: nn.Module, windows: torch.Tensor) -> float:
    """Return the mean over layers, heads and query positions of the largest attention probability.

    Needs a model loaded with ``attn_implementation="eager"`` (fused kernels return no probabilities).
    """
    device = input_device(model)  # a dispatched model may have its embeddings offloaded
    total, n = 0.0, 0
    for w in windows:
        out = model(input_ids=w[None].to(device), output_attentions=True)
        if not out.attentions or out.attentions[0] is None:
            raise InvalidArgumentError(
                "the model returned no attention probabilities; load it with attn_implementation='eager'"
            )
        for a in out.attentions:
            total += a.float().amax(-1).mean().item()
            n += 1
    return total / n


def ablation_study(
    model: nn.Module,
    ids: torch.Tensor,
    dims: list[int],
    *,
    points="attn_in",
    mode: str = "zero",
    controls: int = 3,
    seed: int = 0,
    window: int = 512,
    max_windows: int = 4,
    attention_windows: int = 2,
    stats: OutlierStats | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Return one row per condition: baseline, the given dims, and ``controls`` random draws.

    Columns: condition, dims, ppl, delta_ppl_pct, top1_attention, delta_top1_pct.
    """
    if not dims:
        raise InvalidArgumentError("no dims to ablate")
    pts = (
        resolve_points(model, points)
        if not (isinstance(points, list) and points and isinstance(points[0], CapturePoint))
        else points
    )
    means = None
    if mode == "mean":
        if stats is None:
            raise InvalidArgumentError("mode='mean' needs the scan statistics (stats=...)")
        means = {p.name: (stats.get(p.name, Stat.SUM) / max(stats.tokens[p.name], 1)).float() for p in pts}
    n_dims = pts[0].dims
    gen = torch.Generator().manual_seed(seed)
    pool = torch.tensor([d for d in range(n_dims) if d not in set(dims)])
    conditions = (
        [("baseline", [])]
        + [("selected", list(dims))]
        + [
            (f"random #{i + 1}", pool[torch.randperm(len(pool), generator=gen)[: len(dims)]].sort().values.tolist())
            for i in range(controls)
        ]
    )
    att_windows = ids[: attention_windows * window].view(-1, window)
    rows = []
    for label, ds in tqdm(conditions, desc="ablate", disable=not progress, leave=False):
        ctx = ablate_dims(model, pts, ds, mode, means) if ds else _null()
        with ctx:
            r = perplexity(model, ids, PerplexitySettings(window=window, max_windows=max_windows), progress=False)
            top1 = mean_top1_attention(model, att_windows)
        rows.append({"condition": label, "dims": ds, "ppl": r.ppl, "top1_attention": top1})
    df = pd.DataFrame(rows)
    base = df.iloc[0]
    df["delta_ppl_pct"] = 100 * (df.ppl / base.ppl - 1)
    df["delta_top1_pct"] = 100 * (df.top1_attention / base.top1_attention - 1)
    return df[["condition", "dims", "ppl", "delta_ppl_pct", "top1_attention", "delta_top1_pct"]]


@contextmanager
def _null():
    yield
