"""The outlier profile's own cells (``outliers profile``, ``studies.profile``): one measure per analysis whose page
section shows the analysis' own result, table and figures.

Each runs one analysis of ``outliers.analysis`` on a (model, corpus), as its command does, and keeps what the
page shows of it: ``data``, the result's numbers (its ``to_dict`` or summary); ``html``, its ``_repr_html_``;
``figures``, its own figures (``outliers.analysis.plots`` and the like) as PNG, base64; ``measured_on``, the
windows and tokens every number of it was measured on. The page is put together from these rows alone, without
the model, so a page is rewritten in seconds and a section computed once is never computed again while its
inputs stay the same.

* ``profile_facts``: the model's facts (``ModelInfo``, its config's shape) and the corpus' token count;
* ``profile_scan``: one outlier scan (``outliers.analysis.scan``, the ``outliers`` measure's capture points and
  settings) for the outlier features under both criteria, the massive activations and kurtosis and ∞-norm by
  block;
* ``profile_sinks``, ``profile_weights``, ``profile_kvcache``, ``profile_range``, ``profile_sensitivity``: the
  analyses of ``outliers sinks``, ``weights``, ``kvcache``, ``range`` and ``sensitivity``.

They take the settings of the study measures that run the same analyses (``outlier_tokens``, ``sink_windows``,
``kvcache_windows``, ``range_windows``, ``sensitivity_windows`` ...): a profile and a study measure alike what
they share, and a fingerprint holds the same settings plus ``PAGE``, the version of what is kept for the page
(raise it when that changes: every stored profile cell becomes stale). The super weights, the lifecycle and
Table 1 are the study measures ``superweights``, ``lifecycle`` and ``perplexity`` themselves.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

from . import Context, Measure, register_measure
from . import kvcache as kv_measure
from . import outliers as scan_measure
from . import range as range_measure
from . import sensitivity as sens_measure
from . import sinks as sink_measure

if TYPE_CHECKING:
    from studies.config import StudyConfig

__all__ = ["PROFILE_MEASURES", "PAGE", "figure_png", "FEATURE_ROWS"]

PAGE = 1  # the version of what a profile cell keeps for the page
FEATURE_ROWS = 24  # outlier features kept per criterion, largest |x| first
DPI = 100


def figure_png(fig: Any, alt: str, part: str = "") -> dict[str, str]:
    """A figure as the page keeps it: ``{"alt", "part", "png"}`` (base64 PNG; ``part``: the page section it
    belongs to, where one cell feeds several); a pyplot figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    if getattr(fig, "number", None) is not None:  # made with pyplot (sensitivity_figure): release it
        import matplotlib.pyplot as plt

        plt.close(fig)
    return {"alt": alt, "part": part, "png": base64.b64encode(buffer.getvalue()).decode("ascii")}


def _meta(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The facts an analysis records beside its numbers, as the commands record them (``run_facts``)."""
    info = ctx.info
    return {
        "model": cell["model"],
        "corpus": cell["corpus"],
        "architecture": info.architecture,
        "n_params": info.n_params,
        "weights": info.weights,
        "weights_sha256": info.weights_sha256,
    }


def _records(frame: Any, n: int | None = None) -> list[dict[str, Any]]:
    """A DataFrame's rows for JSON: NaN as None, numpy scalars as Python's."""
    import json

    frame = frame.head(n) if n is not None else frame
    return json.loads(frame.to_json(orient="records"))


def _bos(ctx: Context) -> str:
    return "window" if ctx.bos_token_id is not None else "corpus"


def _page_only(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    """The fingerprint of a cell that reads the weights alone: no setting changes its numbers."""
    return {"page": PAGE}


def _on_page(fingerprint: Any) -> Any:
    """A study measure's fingerprint with ``PAGE`` beside it: the same settings, and what the page keeps."""
    return lambda cell, cfg: {"page": PAGE, **fingerprint(cell, cfg)}


def _windowed(
    ctx: Context,
    res: Any,
    figures: list[dict[str, str]],
    *,
    tokens: int | None = None,
    bos: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The cell of an analysis measured on windows (``res``: its result, with ``window``, ``n_windows``, ``bos``
    and ``n_tokens``, ``to_dict`` and ``_repr_html_``): its numbers, its page and what they were measured on;
    ``extra``: more of the result the page shows."""
    tokens = res.n_tokens if tokens is None else tokens
    return {
        "n_params": ctx.info.n_params,
        "n_tokens": tokens,
        "measured_on": {
            "tokens": tokens,
            "window": res.window,
            "windows": res.n_windows,
            "bos": res.bos if bos is None else bos,
        },
        "data": res.to_dict(),
        **extra,
        "html": res._repr_html_(),
        "figures": figures,
    }


# ---------------------------------------------------------------------------------------------------- facts


def _facts(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    config = getattr(ctx.model, "config", None)

    def get(*names: str) -> Any:
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return None

    shape = {
        "layers": get("num_hidden_layers", "n_layer"),
        "hidden": get("hidden_size", "n_embd"),
        "heads": get("num_attention_heads", "n_head"),
        "kv_heads": get("num_key_value_heads"),
        "head_dim": get("head_dim"),
        "ffn": get("intermediate_size", "ffn_dim", "n_inner"),
        "vocab": get("vocab_size"),
        "max_positions": get("max_position_embeddings", "n_positions"),
        "rope_theta": get("rope_theta"),
        "tied_embeddings": get("tie_word_embeddings"),
        "sliding_window": get("sliding_window"),
    }
    return {
        "n_params": ctx.info.n_params,
        "info": ctx.info.to_dict(),
        "config": {k: v for k, v in shape.items() if v is not None},
        "tokenizer": type(ctx.tokenizer).__name__,
        "corpus_tokens": int(len(ctx.ids)),
        "bos_token_id": ctx.bos_token_id,
        "window": ctx.cfg.window,
        "batch_size": ctx.cfg.batch_size,
        "dtype": ctx.cfg.dtype,
        "bos": ctx.cfg.bos,
    }


# ---------------------------------------------------------------------------------------------------- the scan


def _scan(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.criteria import Criteria, massive_activations, outlier_features, summary, top_values
    from outliers.analysis.moments import layer_table, quantizability
    from outliers.analysis.plots import kurtosis_by_block, layer_dim_heatmap, layers_vs_positions

    cfg = ctx.cfg
    st = scan_measure_scan(cell, ctx)
    criteria = {scale: Criteria(scale=scale) for scale in ("absolute", "relative")}
    features = {scale: outlier_features(st, c) for scale, c in criteria.items()}
    massive = massive_activations(st).sort_values(["max_abs"], ascending=False)
    tops = top_values(st, ctx.tokenizer)
    n_windows = st.meta["tokens_scanned"] // cfg.window
    figures = [
        figure_png(layers_vs_positions(st, criteria["absolute"]), "outlier dims, absolute criterion", "features"),
        figure_png(layers_vs_positions(st, criteria["relative"]), "outlier dims, relative criterion", "features"),
        figure_png(layer_dim_heatmap(st, "hidden"), "max |x| per block of the top hidden dims", "features"),
    ]
    if "residual" in st.spaces:
        figures.append(figure_png(layer_dim_heatmap(st, "residual"), "max |x| per block output, top dims", "massive"))
    figures.append(figure_png(kurtosis_by_block(st), "kurtosis and ∞-norm by block", "kurtosis"))
    return {
        "n_params": ctx.info.n_params,
        "n_tokens": st.meta["tokens_scanned"],
        "measured_on": {
            "tokens": st.meta["tokens_scanned"],
            "window": cfg.window,
            "windows": n_windows,
            "bos": _bos(ctx),
        },
        "data": {
            "threshold": st.threshold,
            "relative_k": st.relative_k,
            "criteria": {"layers": criteria["absolute"].layers, "positions": criteria["absolute"].positions},
            "summary": {scale: summary(st, c) for scale, c in criteria.items()},
            "features": {scale: _records(f, FEATURE_ROWS) for scale, f in features.items()},
            "n_features": {scale: len(f) for scale, f in features.items()},
            "massive": _records(massive),
            "top_values": _records(tops, 12),
            "layers": _records(layer_table(st)),
            "quantizability": quantizability(st),
        },
        "html": st._repr_html_(),
        "figures": figures,
    }


def scan_measure_scan(cell: dict[str, Any], ctx: Context) -> Any:
    """The ``outliers`` measure's scan (its capture points and settings), with the model's facts as meta."""
    from outliers.analysis.scan import scan

    cfg = ctx.cfg
    return scan(
        ctx.model,
        ctx.ids,
        points=scan_measure.POINTS,
        threshold=cfg.outlier_threshold,
        max_tokens=cfg.outlier_tokens,
        window=cfg.window,
        batch_size=cfg.batch_size,
        progress=ctx.progress,
        meta=_meta(cell, ctx),
        bos_token_id=ctx.bos_token_id,
    )


def _scan_fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"page": PAGE, **scan_measure.fingerprint(cell, cfg), "outlier_threshold": cfg.outlier_threshold}


# ---------------------------------------------------------------------------------------------------- sinks


def _sinks(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.plots import sink_heatmap, sink_norms
    from outliers.analysis.sinks import attention_sinks

    cfg = ctx.cfg
    res = attention_sinks(
        ctx.model,
        ctx.ids,
        window=cfg.window,
        max_windows=sink_measure._windows(cfg),
        batch_size=cfg.batch_size,
        epsilon=sink_measure._epsilon(cfg),
        bos_token_id=ctx.bos_token_id,
        progress=ctx.progress,
        meta=_meta(cell, ctx),
    )
    figures = [
        figure_png(sink_heatmap(res), "attention sinks: head map"),
        figure_png(sink_norms(res), "first-token and other-token hidden-state norms"),
    ]
    return _windowed(ctx, res, figures, tokens=res.n_windows * res.window)


# ---------------------------------------------------------------------------------------------------- weights


def _weights(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.plots import weight_layers, weight_reconstructions
    from outliers.analysis.weights import weight_histogram, weight_stats

    meta = _meta(cell, ctx)
    res = weight_stats(ctx.model, progress=ctx.progress, meta=meta)
    s = res.summary()
    figures = [figure_png(weight_layers(res), "largest |w| and kurtosis per block and linear")]
    if s.get("n_layers"):
        hist = weight_histogram(ctx.model, s["max_abs_layer"], meta=meta)
        figures.append(figure_png(weight_reconstructions(hist), f"weights of {hist.name} and their int8 copies"))
    return {
        "n_params": ctx.info.n_params,
        "measured_on": {"weights": ctx.info.weights, "layers": s.get("n_layers", 0), "values": s.get("n_weights", 0)},
        "data": {"summary": s, "methods": list(res.methods), "skipped": res.skipped},
        "html": res._repr_html_(),
        "figures": figures,
    }


# ---------------------------------------------------------------------------------------------------- key cache


def _kvcache(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.kvcache import kv_channels
    from outliers.analysis.kvcache_plots import kv_concentration, kv_heatmap

    cfg = ctx.cfg
    res = kv_channels(
        ctx.model,
        ctx.ids,
        window=cfg.window,
        max_windows=kv_measure._windows(cfg),
        batch_size=cfg.batch_size,
        k=kv_measure._k(cfg),
        bos_token_id=ctx.bos_token_id,
        progress=ctx.progress,
        meta=_meta(cell, ctx),
    )
    kinds = set(res.channels.kind)
    figures = [figure_png(kv_heatmap(res, "keys"), "key channels, pre-RoPE: max |x| per layer and channel")]
    if "keys_cached" in kinds:
        figures.append(figure_png(kv_heatmap(res, "keys_cached"), "key channels as cached, post-RoPE"))
    figures.append(figure_png(kv_concentration(res), "channel concentration of keys and values per layer"))
    return _windowed(ctx, res, figures)


# ---------------------------------------------------------------------------------------------------- range


def _range(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.range import format_headroom
    from outliers.eval.windows import PerplexitySettings

    cfg = ctx.cfg
    settings = PerplexitySettings("chunks", cfg.window, None, range_measure._windows(cfg), cfg.batch_size, cfg.bos)
    res = format_headroom(
        ctx.model, ctx.ids, settings, bos_token_id=ctx.bos_token_id, progress=ctx.progress, meta=_meta(cell, ctx)
    )
    return _windowed(ctx, res, [], blocks=_records(res.block_table()))


# ---------------------------------------------------------------------------------------------------- sensitivity


def _sensitivity(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.sensitivity import sensitivity
    from outliers.analysis.sensitivity_plots import sensitivity_figure
    from outliers.eval.windows import PerplexitySettings

    cfg = ctx.cfg
    settings = PerplexitySettings("chunks", cfg.window, None, sens_measure._windows(cfg), cfg.batch_size, cfg.bos)
    res = sensitivity(
        ctx.model,
        ctx.ids,
        settings,
        cell["method"],
        unit=sens_measure._unit(cfg),
        bos_token_id=ctx.bos_token_id,
        random_draws=sens_measure._random(cfg),
        progress=ctx.progress,
        model_name=cell["model"],
        corpus_name=cell["corpus"],
    )
    figures = [figure_png(sensitivity_figure(res), f"KL of each {res.unit} quantized alone")]
    return _windowed(ctx, res, figures, bos=_bos(ctx), units=_records(res.table()))


PROFILE_MEASURES = tuple(
    register_measure(m)
    for m in (
        Measure(name="profile_facts", compute=_facts, fingerprint=_page_only),
        Measure(
            name="profile_scan",
            compute=_scan,
            cells=scan_measure.cells,
            fingerprint=_scan_fingerprint,
            columns={"n_tokens": "INTEGER"},
        ),
        Measure(
            name="profile_sinks",
            compute=_sinks,
            fingerprint=_on_page(sink_measure.fingerprint),
            columns={"n_tokens": "INTEGER"},
        ),
        Measure(name="profile_weights", compute=_weights, fingerprint=_page_only),
        Measure(
            name="profile_kvcache",
            compute=_kvcache,
            fingerprint=_on_page(kv_measure.fingerprint),
            columns={"n_tokens": "INTEGER"},
        ),
        Measure(
            name="profile_range",
            compute=_range,
            fingerprint=_on_page(range_measure.fingerprint),
            columns={"n_tokens": "INTEGER"},
        ),
        Measure(
            name="profile_sensitivity",
            compute=_sensitivity,
            cells=sens_measure.cells,
            fingerprint=_on_page(sens_measure.fingerprint),
            columns={"n_tokens": "INTEGER"},
        ),
    )
)
