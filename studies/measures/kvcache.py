"""Key-cache channels: whether a model's keys have outlier channels, before and after RoPE, and its values none.

KIVI (Liu et al. 2024, arXiv 2402.02750) and KVQuant (Hooper et al. 2024,
arXiv 2401.18079): keys have fixed outlier channels (quantize them per
channel, pre-RoPE), values do not (per token). One run of
``outliers.analysis.kvcache`` per (model, corpus) over ``kvcache_windows``
windows of the study's ``window``; the result keeps, per kind of tensor
(projected keys, keys after the key norm where there is one, cached keys,
values), the share of layers with outlier channels (max |x| >= k x the
layer's median channel max), the median channel concentration, and the int8
per-token and per-channel relative errors; and the mean RoPE overlap.

Its settings default to None (meaning 4 windows and k = 4), so that the
``study.json`` and report of a study that does not take this measure stay as
they were; the result lives in the row's JSON (no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["KVCACHE", "kvcache_table"]

WINDOWS, K = 4, 4.0
SETTINGS = (
    Setting("kvcache_windows", (int,), None),  # None: WINDOWS windows of the study's window
    Setting("kvcache_k", (int, float), None),  # None: K (outlier channel at max |x| >= K x the median channel's)
)


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.kvcache_windows is None else int(cfg.kvcache_windows)


def _k(cfg: StudyConfig) -> float:
    return K if cfg.kvcache_k is None else float(cfg.kvcache_k)


def validate(cfg: StudyConfig) -> None:
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"kvcache_windows must be >= 1, got {cfg.kvcache_windows}")
    if not _k(cfg) > 1:
        raise InvalidArgumentError(f"kvcache_k must be > 1, got {cfg.kvcache_k}")


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"kvcache_windows": _windows(cfg), "kvcache_k": _k(cfg), "batch_size": cfg.batch_size}


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.kvcache import kv_channels

    cfg = ctx.cfg
    res = kv_channels(
        ctx.model,
        ctx.ids,
        window=cfg.window,
        max_windows=_windows(cfg),
        batch_size=cfg.batch_size,
        k=_k(cfg),
        bos_token_id=ctx.bos_token_id,
        progress=ctx.progress,
    )
    d = res.to_dict()
    return {
        "n_params": ctx.info.n_params,
        **{k: d[k] for k in ("n_tokens", "window", "n_windows", "bos", "k", "cached", "kv_heads", "head_dim")},
        **{k: d[k] for k in ("rotary_dim", "rope_overlap", "rope_pair_overlap", "summary")},
    }


def kvcache_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): outlier-channel layers, concentrations pre/post RoPE, int8 errors of keys."""
    import pandas as pd

    rows = []
    for r in df[(df.kind == "kvcache") & (df.status == "done")].itertuples():
        res = r.result
        s = res["summary"]
        keys, values = s["keys"], s["values"]
        cached = s.get("keys_cached", keys)  # "projected": no RoPE or key norm, the cache holds these keys
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "layers with key outliers": keys["layers_with_outliers"],
                "key conc pre-RoPE": keys["median_concentration"],
                "key conc cached": cached["median_concentration"],
                "value conc": values["median_concentration"],
                "key err per-token": keys["err_per_token"],
                "key err per-channel": keys["err_per_channel"],
                "value err per-token": values["err_per_token"],
                "value err per-channel": values["err_per_channel"],
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"]) if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The key-cache table."""
    if not (df.kind == "kvcache").any():
        return ["No key-cache measurement is done yet.", ""]
    return [
        "## Key-cache channels (KIVI, KVQuant: keys have outlier channels, values do not)",
        "",
        f"{_windows(cfg)} windows of {cfg.window} tokens per model and corpus, bos {cfg.bos}. A key channel is an "
        f"outlier at max |x| >= {_k(cfg):g} x its layer's median channel max; conc is the top channel's max over "
        "that median (median over layers), pre-RoPE as the key projection makes them and as cached (after any key "
        "norm and RoPE). Errors: int8 absmax of each window, per token or per channel, ||X - X^|| / ||X|| "
        "(mean over layers).",
        "",
        Table(kvcache_table(df), "kvcache", ".3f"),
        "",
    ]


KVCACHE = register_measure(
    Measure(
        name="kvcache",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
