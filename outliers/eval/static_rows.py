"""The ``static`` row kind: static per-tensor activation scales (W8A8), with or without PrefixQuant's prefix.

A row named ``static-CAL`` or ``static-CAL+prefix`` (``outliers eval --method``; a transform may follow,
``static-p99.9@smooth=0.5``):

``CAL``      ``minmax``: each linear input's scale is its largest ``|x|`` over the calibration text;
             ``pQ`` (``p99.9``, ``p99.99``, any Q in (0, 100)): the Q-th percentile of ``|x|`` over every value
             of that input (exact: ``outliers.quant.static``). Values beyond the scale saturate at ±127.
``+prefix``  PrefixQuant's recipe: the first token (the tokenizer's BOS where it has one, else the
             corpus' first token) and the most frequent outlier tokens (``outliers.quant.prefix``, found on
             the calibration text) go before every window, unscored; their positions pass through the
             float weights; the scales are calibrated with the prefix there, its positions left out.
             ``+prefix=N``: at most N tokens (default 4), ``+prefix=1`` the first token alone.

Weights are int8 per output channel (``absmax-vector``'s codes). Calibration reads
``calib_windows`` windows (default 4; a ``Row`` option) from the end of the calibration text, after
the tokens evaluation reads (``RowEvaluator.reserved``), cut as the evaluated windows are
(``bos="window"``: each starts with the BOS). A prefixed row is compared with the float model given the
same prefix (``Prepared.reference_prefix``). Calibrations, prefixes and the quantized copy are held on
the evaluator: rows that differ only in ``CAL`` share one calibration pass.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from outliers.errors import InvalidArgumentError
from outliers.eval.rows import Prepared, Row, RowEvaluator, RowKind, register_row_kind
from outliers.quant.calibration import calibration_windows
from outliers.quant.transform_spec import Transform, parse_row

__all__ = [
    "STATIC",
    "CALIB_WINDOWS",
    "PREFIX_TOKENS",
    "parse_static",
    "static_label",
    "with_tokenizer",
    "prefix_notes",
]

STATIC = "static"
CALIB_WINDOWS = 4
PREFIX_TOKENS = 4  # PrefixQuant's prefixes hold 1 to 4 tokens
LOWEST = 0.999  # one calibration pass answers min-max and every percentile from here up
_NAME = re.compile(r"static-(minmax|p(\d+(?:\.\d+)?))(\+prefix(?:=(\d+))?)?")


def parse_static(name: str, transform: Transform, options: dict[str, Any]) -> Row | None:
    """The static row ``name`` stands for (``static-p99.9+prefix``), or None for a name of another kind.

    Raises:
        InvalidArgumentError: a ``static-`` name that is not one.
    """
    base = name.partition("@")[0]
    if not base.startswith("static-"):
        return None
    m = _NAME.fullmatch(base)
    q = round(float(m.group(2)) / 100, 12) if m and m.group(2) else None  # 0.999, not 0.9990000000000001
    prefix = None if not m or not m.group(3) else int(m.group(4)) if m.group(4) else PREFIX_TOKENS
    if m is None or (q is not None and not 0 < q < 1) or prefix == 0:
        raise InvalidArgumentError(
            f"static row {name!r}: expected static-minmax or static-pQ (0 < Q < 100, e.g. static-p99.9), "
            "then +prefix or +prefix=N (N >= 1), e.g. static-p99.99+prefix"
        )
    if "@" in name:
        base, transform = parse_row(name, seed=transform.seed, calib_windows=transform.calib_windows)
    kept = {k: v for k, v in options.items() if k == "skip"}
    calibration = "minmax" if q is None else f"p{m.group(2)}"
    return Row(
        base, transform, kind=STATIC, options={"calibration": calibration, "quantile": q, "prefix": prefix}, **kept
    )


def static_label(row: Row, dtype: str = "fp32") -> str:
    """``static W8A8 p99.9 + prefix`` (after its transform, where there is one)."""
    o = row.options
    cal = "min-max" if o.get("quantile") is None else o["calibration"]
    prefix = (
        "" if not o.get("prefix") else " + prefix" + (f" (≤ {o['prefix']})" if o["prefix"] != PREFIX_TOKENS else "")
    )
    t = row.transform
    return f"static W8A8 {cal}{prefix}" + (f" after {t.label}" if t else "")


def with_tokenizer(rows: list[Row], tokenizer: Any) -> list[Row]:
    """Static rows told the tokenizer's BOS (their prefix's first token); the other rows as they are."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return [replace(r, options={**r.options, "first_token": bos}) if r.kind == STATIC else r for r in rows]


def prefix_notes(results: list[Any], labels: list[str], tokenizer: Any = None) -> list[str]:
    """One line per static row: the share of quantized values beyond the scale, and the prefix it read."""
    out = []
    for r, label in zip(results, labels, strict=True):
        if "static_calibration" not in r.extra:
            continue
        line = f"{label}: {r.extra['saturated_pct']:.4f} % of quantized values saturated"
        if ids := r.extra.get("prefix_ids"):
            shown = [tokenizer.decode([t]) for t in ids] if tokenizer is not None else ids
            line += f"; prefix {shown} (ids {ids}), compared with the float model given the same prefix"
        out.append(line)
    return out


def _windows(ev: RowEvaluator, n: int) -> torch.Tensor:
    """``n`` calibration windows cut as the evaluated ones are: after ``ev.reserved``, from the end."""
    lead = ev.settings.prefix  # bos="window": a BOS, then window - 1 tokens
    windows = calibration_windows(ev.calib_ids, ev.settings.window - lead, n, reserved=ev.reserved)
    if lead:
        assert ev.bos_token_id is not None  # window_ids refused bos='window' without one
        windows = torch.cat([torch.full((n, 1), ev.bos_token_id, dtype=windows.dtype), windows], dim=1)
    return windows


def _cache(ev: RowEvaluator, source: nn.Module) -> dict[Any, Any]:
    """What this kind holds for ``source``: prefixes and calibrations (dropped with another source)."""
    held = ev.held.get(STATIC)
    if held is None or held[0] is not source:
        held = ev.held[STATIC] = (source, {})
    return held[1]


def _prefix(ev: RowEvaluator, source: nn.Module, row: Row, windows: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The prefix's token ids, found on the calibration windows by the float model; seconds spent."""
    from outliers.quant.prefix import TokenCounts, choose_prefix, outlier_flags

    first = row.options.get("first_token")
    if first is None:
        first = ev.bos_token_id if ev.bos_token_id is not None else int(ev.ids[0])
    cache = _cache(ev, source)
    key = ("counts", windows.shape)
    started = time.perf_counter()
    if key not in cache:
        counts = TokenCounts()
        for start in range(0, len(windows), ev.settings.batch_size):
            batch = windows[start : start + ev.settings.batch_size]
            counts.add(batch, outlier_flags(source, batch))
        cache[key] = counts
    ids = choose_prefix(cache[key], int(first), max_tokens=row.options["prefix"])
    return torch.tensor(ids, dtype=torch.long), time.perf_counter() - started


def _prepare(row: Row, ev: RowEvaluator) -> Prepared:
    from outliers.quant.model import QuantReport
    from outliers.quant.static import calibrate, set_prefix, set_scales, static_copy

    source, facts, setup = ev.transformed(row.transform)
    n_windows = int(row.options.get("calib_windows", CALIB_WINDOWS))
    windows = _windows(ev, n_windows)
    prefix, spent = None, 0.0
    if row.options.get("prefix"):
        prefix, spent = _prefix(ev, source, row, windows)
    q = row.options.get("quantile")
    lowest = min(LOWEST, q) if q is not None else LOWEST
    cache = _cache(ev, source)
    key = ("calibration", windows.shape, None if prefix is None else tuple(prefix.tolist()), row.skip, lowest)
    started = time.perf_counter()
    if key not in cache:
        cache[key] = calibrate(
            source, windows, lowest=lowest, prefix=prefix, skip=row.skip, batch_size=ev.settings.batch_size
        )
    calib = cache[key]
    setup["calibrate_seconds"] = spent + time.perf_counter() - started
    held = ev.held.get("quantized")
    if held is None or held[0] is not source or held[1] != (STATIC, row.skip):
        ev.held.pop("quantized", None)  # one quantized copy at a time
        started = time.perf_counter()
        copy, names, skipped, before, after = static_copy(source, row.skip)
        report = QuantReport(STATIC, 0.0, "int8", names, skipped, before, after)
        setup["quantize_seconds"] = time.perf_counter() - started
        held = ev.held["quantized"] = (source, (STATIC, row.skip), copy, report)
    copy, report = held[2], replace(held[3], method=row.method)
    set_scales(copy, calib.scales(q))
    state = set_prefix(copy, 0 if prefix is None else len(prefix))
    facts |= {"static_calibration": row.options["calibration"], "calib_windows": n_windows, **calib.facts()}
    if prefix is not None:
        facts["prefix_ids"] = prefix.tolist()
    setup["quantize_seconds"] = setup.get("quantize_seconds", 0.0) + setup["calibrate_seconds"]

    @contextmanager
    def counted() -> Iterator[None]:
        state.reset_counts()
        try:
            yield
        finally:
            facts["saturated_pct"] = 100 * state.saturated / max(state.values, 1)

    return Prepared(
        copy,
        compare=True,
        context=counted(),
        report=report,
        facts=facts,
        setup=setup,
        prefix=prefix,
        reference_prefix=prefix is not None,
    )


register_row_kind(
    RowKind(
        STATIC,
        _prepare,
        "static W8A8: per-tensor activation scales calibrated offline, per-channel weights; PrefixQuant's prefix",
        label=static_label,
        parse=parse_static,
    )
)
