"""The outlier lifecycle: super weight → massive activation → sinks → key channels → quantization error, traced by
causal edits with paired intervals.

One run of ``outliers.analysis.lifecycle.trace`` per (model, corpus) over ``lifecycle_windows`` windows of the
study's ``window`` (the study's ``bos``): the chain as the unedited model shows it, and five passes, one per
edit (none, the super weights zeroed, zeroed with the super activation restored, the massive dim clamped at its
birth block, the same clamp on a random other dim), each measuring the massive activation, the sink rate, the
first-token attention, the median key concentration, the perplexity and the KL of each quantized row
(``lifecycle_rows``, llm.int8 by default) against the edited float model; every change against the unedited
model with a paired interval over windows.

Its settings default to None (meaning 8 windows and llm.int8), so that the ``study.json`` and report of a study
that does not take this measure stay as they were; the result lives in the row's JSON (no new store column).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from outliers.errors import InvalidArgumentError

from . import Context, Image, Measure, Setting, Table, register_measure

if TYPE_CHECKING:
    import pandas as pd

    from studies.config import StudyConfig

__all__ = ["LIFECYCLE", "lifecycle_table", "chain_table"]

WINDOWS, ROWS = 8, ("llm.int8",)
SETTINGS = (
    Setting("lifecycle_windows", (int,), None),  # None: WINDOWS windows of the study's window
    Setting("lifecycle_rows", (list,), None, items=(str,)),  # None: ROWS, the quantized rows whose KL is measured
)
# the report's columns: (field, header, format)
COLUMNS = (
    ("massive_activation", "massive |h|", ".4g"),
    ("sink_rate", "sink rate", ".3f"),
    ("first_token_attention", "first-token attention", ".3f"),
    ("key_concentration", "key conc", ".3g"),
    ("ppl", "ppl", ".4g"),
)


def _windows(cfg: StudyConfig) -> int:
    return WINDOWS if cfg.lifecycle_windows is None else int(cfg.lifecycle_windows)


def _rows(cfg: StudyConfig) -> tuple[str, ...]:
    return ROWS if cfg.lifecycle_rows is None else tuple(cfg.lifecycle_rows)


def _settings(cfg: StudyConfig) -> Any:
    from outliers.analysis.lifecycle import TraceSettings

    return TraceSettings(window=cfg.window, max_windows=_windows(cfg), batch_size=cfg.batch_size, rows=_rows(cfg))


def validate(cfg: StudyConfig) -> None:
    if _windows(cfg) < 1:
        raise InvalidArgumentError(f"lifecycle_windows must be >= 1, got {cfg.lifecycle_windows}")
    _settings(cfg).check()


def fingerprint(cell: dict[str, Any], cfg: StudyConfig) -> dict[str, Any]:
    return {"lifecycle_windows": _windows(cfg), "lifecycle_rows": list(_rows(cfg)), "batch_size": cfg.batch_size}


def compute(cell: dict[str, Any], ctx: Context) -> dict[str, Any]:
    from outliers.analysis.lifecycle import trace

    res = trace(
        ctx.model,
        ctx.ids,
        _settings(ctx.cfg),
        bos_token_id=ctx.bos_token_id,
        tokenizer=ctx.tokenizer,
        progress=ctx.progress,
    )
    d = res.to_dict()
    d["chain"] = {k: v for k, v in d["chain"].items() if k != "heads"}  # every head: in `outliers trace --json`
    return {"n_params": ctx.info.n_params, "n_tokens": res.n_windows * res.settings.window, **d}


def _text(e: dict[str, Any], field: str, fmt: str) -> str:
    if not e.get("applicable"):
        return "n/a"
    v = e.get(field)
    if v is None:
        return "-"
    if e["edit"] == "none" or e.get(f"{field}_delta") is None:
        return f"{v:{fmt}}"
    ci = e.get(f"{field}_delta_ci95")
    interval = f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else ""
    return f"{v:{fmt}} ({e[f'{field}_delta']:+.3g}{interval})"


def _done(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df.kind == "lifecycle") & (df.status == "done")]


def lifecycle_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus, edit): each field's value and, for an edit, its change against none [95 %]."""
    import pandas as pd

    from outliers.analysis.lifecycle import row_field

    rows = []
    for r in _done(df).itertuples():
        res = r.result
        for e in res["edits"]:
            row = {"model": r.model, "corpus": r.corpus, "params (M)": res["n_params"] / 1e6, "edit": e["edit"]}
            row |= {header: _text(e, f, fmt) for f, header, fmt in COLUMNS}
            row |= {f"{m} KL": _text(e, row_field(m), ".4g") for m in res["settings"]["rows"]}
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"], kind="stable") if rows else pd.DataFrame(rows)


def chain_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, corpus): the chain as the unedited model shows it."""
    import pandas as pd

    rows = []
    for r in _done(df).itertuples():
        res, c = r.result, r.result["chain"]
        sw, m = c["super_weights"], c["massive"]
        kl: dict[str, Any] = next(iter(c["kl_share"].values()), {})
        rows.append(
            {
                "model": r.model,
                "corpus": r.corpus,
                "params (M)": res["n_params"] / 1e6,
                "super weight (block, row, col)": f"{sw[0]['block']}, {sw[0]['row']}, {sw[0]['col']}" if sw else "none",
                "massive dim (birth block)": f"{m[0]['dim']} ({m[0]['birth_block']})" if m else "none",
                "massive tokens %": 100 * c["massive_token_share"],
                "sink heads": f"{c['n_sink_heads']}/{c['n_counted_heads']}",
                "key conc (without massive tokens)": (
                    f"{c['key_concentration']:.3g} ({c['key_concentration_other_tokens']:.3g})"
                    if c["key_concentration"] is not None
                    else "-"
                ),
                "KL share on massive tokens %": 100 * kl["kl_share"] if kl.get("kl_share") is not None else None,
            }
        )
    return pd.DataFrame(rows).sort_values(["params (M)", "corpus"], kind="stable") if rows else pd.DataFrame(rows)


def report(df: pd.DataFrame, cfg: StudyConfig) -> list:
    """The chain table, the edits' table and one diagram per (model, corpus)."""
    if not (df.kind == "lifecycle").any():
        return ["No lifecycle trace is done yet.", ""]
    from outliers.analysis.lifecycle_plots import chain_figure

    parts: list = [
        "## Outlier lifecycle (super weight → massive activation → sinks → key channels → quantization error)",
        "",
        f"{_windows(cfg)} windows of {cfg.window} tokens per model and corpus, bos {cfg.bos}. The chain as the "
        "unedited model shows it: the super weight by the spike rule, the massive dim and the block where it is "
        "born, the share of tokens that carry it, the heads that put more than 0.3 of their attention on them, "
        "the median key-channel concentration (top channel's max over the median channel's, over layers) with and "
        "without those tokens, and the share of the quantized row's KL that falls on them.",
        "",
        Table(chain_table(df), "lifecycle_chain", ".3g"),
        "",
        "Each edit measured against the unedited model on the same windows: value (change [95 % paired interval, "
        "windows resampled]). n/a: the model gives the edit nothing to act on (no super weight by the spike rule). "
        "The KL is the quantized row's against the edited float model.",
        "",
        Table(lifecycle_table(df), "lifecycle", ".3g"),
        "",
    ]
    for i, r in enumerate(_done(df).itertuples()):
        fig = chain_figure(r.result | {"model": r.model})
        parts += [Image(fig, f"lifecycle_{i}.png", f"lifecycle of {r.model} on {r.corpus}"), ""]
    return parts


LIFECYCLE = register_measure(
    Measure(
        name="lifecycle",
        compute=compute,
        settings=SETTINGS,
        fingerprint=fingerprint,
        columns={"n_tokens": "INTEGER"},
        report=report,
        validate=validate,
    )
)
