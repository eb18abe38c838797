"""``capture``: outlier statistics streamed from forward pre-hooks that always remove themselves.

The hooks themselves are ``outliers.arch.hooks``.

Hooks are global state on the model: every hook registered here is removed
in a ``finally``, on every exit path, exceptions included.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

from outliers.arch.hooks import pre_hooks, record_inputs  # re-exported: they lived here before

if TYPE_CHECKING:
    from outliers.analysis.stats import OutlierStats

__all__ = ["capture", "pre_hooks", "record_inputs"]


@contextmanager
def capture(
    model: nn.Module,
    points=("attn_in", "attn_out", "ffn_in"),
    *,
    threshold: float = 6.0,
    relative_k: float = 6.0,
    top_k: int = 32,
    patterns: dict[str, str] | None = None,
    stats=None,
    moments: bool = True,
) -> Iterator[OutlierStats]:
    """Measure hidden-state statistics at capture points while the block runs.

    ``with capture(model, points="attn,ffn", threshold=6.0) as stats: model(ids)``
    fills ``stats`` (an ``OutlierStats``) on every forward pass inside the
    block. Pass ``attention_mask`` to the model as usual: masked positions are
    not counted. Every hook is removed on exit, exceptions included.

    Args:
        points: kinds or shorthands (``"attn,ffn,residual"``) or a list of
            ``CapturePoint``s from ``resolve_points``.
        threshold: the magnitude cut-off ``t`` (> 0).
        relative_k: the scale-relative cut-off, ``|x| >= k * rms(token)``.
        top_k: how many of the largest values to keep with their positions.
        patterns: per-kind regexes overriding the architecture table.
        stats: an ``OutlierStats`` to keep adding to (e.g. a resumed scan).
        moments: also keep the kurtosis and ∞-norm sums (``PointStat``).
    """
    from outliers.analysis.points import CapturePoint, resolve_points
    from outliers.analysis.stats import OutlierStats

    if isinstance(points, (list, tuple)) and points and isinstance(points[0], CapturePoint):
        pts = list(points)
    else:
        pts = resolve_points(model, points, patterns)
    from outliers.models.dispatch import input_device

    device = input_device(model)  # a dispatched model's first weight may be offloaded (meta)
    if stats is None:
        stats = OutlierStats(pts, float(threshold), float(relative_k), top_k, moments=moments).to(device)
    index = {p.name: i for i, p in enumerate(stats.points)}
    state: dict = {"union": {}, "mask": None, "labels": None, "seqs": 0, "moved": {}}

    def on_model(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        state["union"] = {}
        state["mask"] = state["labels"] = None
        state["moved"] = {}
        if ids is None or ids.dim() != 2:
            return
        b, s = ids.shape
        if mask is not None and mask.shape == ids.shape and not bool(mask.all()):
            state["mask"] = mask.reshape(-1).bool()
        seq = (torch.arange(b, device=ids.device) + state["seqs"]).repeat_interleave(s)
        pos = torch.arange(s, device=ids.device).repeat(b)
        labels = (seq, pos, ids.reshape(-1))
        state["labels"] = tuple(t[state["mask"]] for t in labels) if state["mask"] is not None else labels
        state["seqs"] += b

    def after_model(module, args, output):
        stats.flush_union(state["union"])
        state["union"] = {}

    def record(point, x):
        x2 = x.detach().reshape(-1, x.shape[-1])
        labels = state["labels"]
        if state["mask"] is not None and x2.shape[0] == state["mask"].numel():
            x2 = x2[state["mask"].to(x2.device)]
        elif labels is not None and x2.shape[0] != labels[0].numel():
            labels = None  # e.g. a cached generation step: no per-position labels
        if labels is not None and labels[0].device != x2.device:  # a block on another device than the input
            if x2.device not in state["moved"]:
                state["moved"][x2.device] = tuple(t.to(x2.device) for t in labels)
            labels = state["moved"][x2.device]
        seq, pos, tok = labels if labels is not None else (None, None, None)
        stats.update(point, x2, state["union"], seq, pos, tok, index[point.name])

    modules = dict(model.named_modules())
    handles = []
    try:
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
        handles.append(model.register_forward_hook(after_model))
        for p in pts:
            if p.kind == "residual":
                handles.append(
                    modules[p.module].register_forward_hook(
                        lambda mod, args, out, p=p: record(p, out[0] if isinstance(out, tuple) else out)
                    )
                )
            else:
                handles.append(modules[p.module].register_forward_pre_hook(lambda mod, args, p=p: record(p, args[0])))
        yield stats
    finally:
        for h in handles:
            h.remove()
        if len({t.device for t in stats.tensors.values()}) > 1:  # blocks on several devices: merge on the CPU
            stats.to("cpu")
