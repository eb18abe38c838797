"""How results show themselves in a notebook: compact HTML for Jupyter's ``_repr_html_``.

``render_html`` lays out any result as a title line, a two-column table of
its headline numbers (a 95 % interval in grey beside a number that has one,
written as ``outliers`` commands print it: ``[low, high]``), one line of
settings in small grey text (model, corpus, window, ... and the weights'
provenance where known) and optionally DataFrames, each capped at
``max_rows`` rows. Every string is escaped; no JavaScript, no stylesheet,
a few inline styles. The ``*_html`` functions pick each result's numbers;
a result's ``_repr_html_`` calls one of them. This module imports nothing
from ``outliers`` at import time, so any result module can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from outliers.analysis.kvcache import KVCacheResult
    from outliers.analysis.sinks import SinkResult
    from outliers.analysis.stats import OutlierStats
    from outliers.analysis.superweight_effects import SuperWeightEffects
    from outliers.analysis.superweights import SuperWeightResult
    from outliers.analysis.weights import WeightStats
    from outliers.eval.result import PerplexityResult

__all__ = [
    "render_html",
    "fmt_interval",
    "provenance",
    "perplexity_html",
    "sinks_html",
    "superweights_html",
    "superweight_effects_html",
    "outlier_stats_html",
    "weights_html",
    "kvcache_html",
]

MAX_ROWS = 10
_GREY = "color:#777"
_SMALL = "color:#777;font-size:85%"
_CELL = "text-align:left;padding:1px 8px 1px 0"


def fmt_interval(ci: Sequence[float] | None, fmt: str = ".3f", scale: float = 1.0) -> str:
    """``[low, high]`` as the commands print it; '' for no interval or a NaN one (fewer than two windows)."""
    if not ci or any(math.isnan(x) for x in ci):
        return ""
    return f"[{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def provenance(meta: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The settings line's entries for the facts ``outliers.cli.common.run_facts`` records, where present."""
    out: list[tuple[str, Any]] = [(k, meta.get(k)) for k in ("architecture", "weights")]
    if meta.get("n_params"):
        out.append(("params", f"{meta['n_params'] / 1e6:.1f}M"))
    for key in ("weights_sha256", "corpus_sha256"):
        if meta.get(key):
            out.append((key.replace("_", " "), str(meta[key])[:12]))
    return out


def _frame_html(frame: pd.DataFrame, max_rows: int) -> str:
    html = frame.head(max_rows).to_html(index=False, border=0, float_format=lambda v: f"{v:.3f}", na_rep="")
    more = len(frame) - max_rows
    if more > 0:
        html += f'<div style="{_SMALL}">… {more} more row{"s" if more > 1 else ""}</div>'
    return html


def render_html(
    title: str,
    rows: Sequence[tuple[Any, ...]],
    settings: Sequence[tuple[str, Any]] = (),
    *,
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
    notes: Sequence[str] = (),
    max_rows: int = MAX_ROWS,
) -> str:
    """Return a result as an HTML fragment for Jupyter.

    Args:
        title: the first line, in bold.
        rows: ``(label, value)`` or ``(label, value, aside)``: a float value is written as the commands
            write it (4 decimals), the aside (an interval, a unit, a count) in grey beside it.
        settings: ``(name, value)`` pairs for the grey settings line (a float as ``:g``); None and ''
            values are left out.
        tables: ``(caption, DataFrame)`` pairs shown below, each capped at ``max_rows`` rows with a
            "… N more rows" note.
        notes: lines in grey below the settings (a warning about rough intervals).
    """
    parts = ['<div class="outliers-result" style="font-size:90%">', f"<div><b>{escape(title)}</b></div>"]
    if rows:
        parts.append('<table style="border-collapse:collapse;margin:2px 0"><tbody>')
        for label, value, *aside in rows:
            side = f' <span style="{_GREY}">{escape(str(aside[0]))}</span>' if aside and aside[0] else ""
            parts.append(
                f'<tr><th style="{_CELL}">{escape(str(label))}</th>'
                f'<td style="{_CELL}">{escape(_fmt(value))}{side}</td></tr>'
            )
        parts.append("</tbody></table>")
    shown = [
        f"{escape(k)} {escape(format(v, 'g') if isinstance(v, float) else str(v))}"
        for k, v in settings
        if v is not None and v != ""
    ]
    if shown:
        parts.append(f'<div style="{_SMALL}">{" · ".join(shown)}</div>')
    parts += [f'<div style="{_SMALL}">{escape(n)}</div>' for n in notes if n]
    for caption, frame in tables:
        if caption:
            parts.append(f'<div style="margin-top:6px"><b>{escape(caption)}</b></div>')
        parts.append(_frame_html(frame, max_rows))
    parts.append("</div>")
    return "\n".join(parts)


# ---------------------------------------------------------------- one function per result


def _named(what: str, *names: str) -> str:
    return " · ".join([what, *(n for n in names if n)])


def perplexity_html(r: PerplexityResult) -> str:
    """``PerplexityResult``: perplexity with its interval, NLL, tokens, speed; against a reference, the paired
    change, KL and top-1 agreement, each with its interval (as ``outliers eval`` prints them)."""
    from outliers.eval.intervals import MIN_WINDOWS

    rows: list[tuple[Any, ...]] = [
        ("perplexity", f"{r.ppl:.4f}", f"{fmt_interval(r.ppl_ci95)} 95 % CI over {r.n_windows} windows".strip()),
        ("mean NLL", r.nll, "nats/token"),
        ("tokens scored", r.n_tokens),
        ("tokens/s", f"{r.tokens_per_s:.1f}", f"{r.seconds:.2f} s"),
    ]
    if r.ref_ppl is not None:
        rows.append(("reference", f"{r.ref_ppl:.4f}", f"{r.ref_dtype}, the same windows"))
    if r.delta_ppl_pct is not None:
        rows.append(
            ("vs reference", f"{r.delta_ppl_pct:+.2f} %", f"{fmt_interval(r.delta_ppl_pct_ci95, '+.2f')} paired")
        )
    if r.kl_vs_ref is not None:
        rows.append(("KL vs reference", f"{r.kl_vs_ref:.5f}", f"{fmt_interval(r.kl_vs_ref_ci95, '.5f')} nats/token"))
    if r.top1_agreement is not None:
        rows.append(
            ("top-1 agreement", f"{100 * r.top1_agreement:.2f} %", fmt_interval(r.top1_agreement_ci95, ".2f", 100))
        )
    settings = [
        ("model", r.model),
        ("corpus", r.corpus),
        ("protocol", r.protocol),
        ("window", r.window),
        ("stride", r.stride if r.protocol == "sliding" else None),
        ("bos", r.bos),
        ("dtype", r.dtype),
        ("method", r.method),
        ("threshold", r.extra.get("threshold")),
        ("outlier weights", r.extra.get("outlier_weights")),
        ("device", r.device),
        *provenance(r.extra),
    ]
    rough = r.n_windows < MIN_WINDOWS and r.n_windows > 0
    note = f"only {r.n_windows} windows: intervals over fewer than {MIN_WINDOWS} windows are rough" if rough else ""
    return render_html(_named("Perplexity", r.model, r.method), rows, settings, notes=[note])


def sinks_html(s: SinkResult) -> str:
    """``SinkResult``: the sink rate and its head counts, the heads by score (capped)."""
    heads = s.heads
    counted = heads[~heads.local]
    local = sorted({int(x) for x in heads[heads.local].layer})
    rows: list[tuple[Any, ...]] = [
        ("sink rate", s.sink_rate, f"{int(counted.sink.sum())} of {len(counted)} heads score > {s.epsilon:g}"),
    ]
    if local:
        rows.append(("rate, all heads", s.sink_rate_all, f"local layers left out above: {', '.join(map(str, local))}"))
    rows.append(("windows", s.n_windows, f"of {s.window} tokens"))
    settings = [
        ("model", s.meta.get("model")),
        ("corpus", s.meta.get("corpus")),
        ("epsilon", f"{s.epsilon:g}"),
        ("window", s.window),
        ("bos", s.bos),
        *provenance(s.meta),
    ]
    tables = [("heads by mean attention to the first token", s.top(len(heads)))]
    return render_html(_named("Attention sinks", s.meta.get("model", "")), rows, settings, tables=tables)


def superweights_html(r: SuperWeightResult) -> str:
    """``SuperWeightResult``: the super weights found as a table, or "none found" and the spike table."""
    import pandas as pd

    rows: list[tuple[Any, ...]] = [
        ("super weights", len(r.weights) or "none found", f"a block jumps at >= {r.jump:g} x the median output max"),
        ("detection stopped", r.stop),
    ]
    if r.weights:
        found = pd.DataFrame([vars(w) for w in r.weights]).drop(columns="dim")
        tables = [("W[row, col] of the block's down projection, stored (out, in)", found)]
    else:
        tables = [("per block: the down projection's largest |input| and |output|", r.spikes)]
    settings = [
        ("model", r.meta.get("model")),
        ("corpus", r.meta.get("corpus")),
        ("window", r.window),
        ("windows", r.n_windows),
        ("jump", f"{r.jump:g}"),
        *provenance(r.meta),
    ]
    return render_html(_named("Super weights", r.meta.get("model", "")), rows, settings, tables=tables)


def superweight_effects_html(e: SuperWeightEffects) -> str:
    """``SuperWeightEffects``: the four perplexities, each with its interval, the edits paired against the
    original (as ``outliers superweights`` prints them)."""
    o = e.original
    rows: list[tuple[Any, ...]] = [("original", f"{o.ppl:.4f}", fmt_interval(o.ppl_ci95))]
    for label, r in (
        ("super weights zeroed", e.zeroed),
        ("+ activation restored", e.restored),
        (f"{e.control_k} others zeroed", e.control),
    ):
        if r is None:
            rows.append((label, "-"))
            continue
        paired = (
            f"  {r.delta_ppl_pct:+.2f} % {fmt_interval(r.delta_ppl_pct_ci95, '+.2f')} paired"
            if r.delta_ppl_pct is not None
            else ""
        )
        rows.append((label, f"{r.ppl:.4f}", f"{fmt_interval(r.ppl_ci95)}{paired}"))
    settings = [
        ("model", o.model),
        ("corpus", o.corpus),
        ("window", o.window),
        ("windows", o.n_windows),
        ("tokens scored", o.n_tokens),
        ("dtype", o.dtype),
        ("restore fraction", f"{e.restore_fraction:g}"),
        ("restored positions", e.restored_positions),
    ]
    note = "perplexity with its 95 % interval; the edits' change paired against the original on the same windows"
    return render_html(_named("Super-weight effects", o.model), rows, settings, notes=[note])


def outlier_stats_html(stats: OutlierStats) -> str:
    """``OutlierStats``: capture points, tokens, thresholds and the paper's outlier-dim count (criteria.summary)
    with the outlier features found (capped)."""
    from outliers.analysis.criteria import Criteria, outlier_features, summary

    criteria = Criteria()
    rows: list[tuple[Any, ...]] = [
        ("capture points", len(stats.points), ", ".join(f"{k} {v}" for k, v in stats.spaces.items())),
        ("threshold", f"{stats.threshold:g}", f"relative: {stats.relative_k:g} x rms(token)"),
    ]
    tables = []
    if criteria.space in stats.spaces:
        s = summary(stats, criteria)
        layers, positions = 100 * criteria.layers, 100 * criteria.positions
        rule = f"{s['criterion']} in >= {layers:g} % of layers and >= {positions:g} % of positions"
        rows += [("tokens", s["tokens"], f"{criteria.space} space"), ("outlier dims", s["outlier_dims"], rule)]
        if s["outlier_dims"]:
            rows += [
                ("% layers", f"{s['pct_layers']:.1f}", "mean over the outlier dims"),
                ("% positions", f"{s['pct_positions']:.1f}", "mean over the outlier dims"),
            ]
            tables.append(("outlier features, largest first", outlier_features(stats, criteria)))
    model = str(stats.meta.get("model", ""))
    settings = [("model", model), ("corpus", stats.meta.get("corpus")), *provenance(stats.meta)]
    return render_html(_named("Outlier statistics", model), rows, settings, tables=tables)


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
    return render_html(_named("Weight outliers", w.meta.get("model", "")), rows, settings, tables=tables)


def kvcache_html(r: KVCacheResult) -> str:
    """``KVCacheResult``: per kind, layers with outlier channels, concentration, per-token vs per-channel error."""
    rows: list[tuple[Any, ...]] = [
        (
            kind,
            f"{100 * v['layers_with_outliers']:.0f} % of layers",
            f"median concentration {v['median_concentration']:.2f}; int8 error per token "
            f"{v['err_per_token']:.4f}, per channel {v['err_per_channel']:.4f}",
        )
        for kind, v in r.summary().items()
    ]
    settings = [("model", r.meta.get("model")), ("k", f"{r.k:g}"), ("window", r.window), *provenance(r.meta)]
    tables = [("per layer", r.layers)]
    return render_html(_named("Key and value channels", r.meta.get("model", "")), rows, settings, tables=tables)
