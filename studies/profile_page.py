"""The profile's page (``index.html``) and data (``profile.json``), from a profile folder's store alone.

Each section shows its analysis' own result: a profile cell's ``_repr_html_`` and figures as the analysis drew
them (``studies.measures.profile``), or a study measure's own report blocks (``superweights``, ``lifecycle``,
``perplexity``: their tables and figures, ``studies.measures``), with the numbers the page adds laid out as
sortable tables. Every section opens with what its numbers were measured on (windows, tokens) and what it
cost; one whose analysis could not run (an encoder, a missing dependency, a measure this version lacks) says
so. The summary above them is sentences made from the numbers below. Nothing here computes an analysis.
"""

from __future__ import annotations

import base64
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from outliers import html_page as page

from .config import StudyConfig, as_tables

if TYPE_CHECKING:
    from .planning import PlannedCell
    from .profile import ProfileSection, SectionCost

__all__ = ["ProfileCells", "write_pages", "summary_sentences", "render_sections"]

PAPER = "Dettmers et al. 2022 (LLM.int8(), arXiv 2208.07339)"


# ---------------------------------------------------------------------------------------------------- cells


@dataclass(frozen=True, eq=False)
class ProfileCells:
    """A profile folder's cells: ``current`` rows (done or older, with their result), ``failed`` rows, and the
    measures with cells still ``pending`` (never computed, or stale)."""

    cfg: StudyConfig
    current: pd.DataFrame
    failed: pd.DataFrame
    pending: frozenset[str]

    @classmethod
    def of(cls, cfg: StudyConfig, planned: Sequence[PlannedCell], frame: pd.DataFrame) -> ProfileCells:
        state = {p.key: p.state for p in planned}
        rows = frame[frame.key.map(lambda k: k in state)]
        current = rows[rows.key.map(lambda k: state[k] in ("done", "older"))]
        failed = rows[rows.key.map(lambda k: state[k] == "failed")]
        pending = frozenset(p.cell["kind"] for p in planned if p.state in ("pending", "stale"))
        return cls(cfg, current.reset_index(drop=True), failed.reset_index(drop=True), pending)

    def rows(self, kind: str) -> pd.DataFrame:
        return self.current[self.current.kind == kind]

    def one(self, kind: str) -> dict[str, Any] | None:
        """The result of the measure's one current cell (the last, if it has several), or None."""
        rows = self.rows(kind)
        return rows.result.iloc[-1] if len(rows) else None

    def error(self, kind: str) -> str | None:
        rows = self.failed[self.failed.kind == kind]
        return str(rows.error.iloc[-1] or "failed").splitlines()[0] if len(rows) else None

    def missing(self, kind: str) -> str | None:
        """Why the measure's section has nothing to show (None: it has its cells)."""
        from .measures import MEASURES

        if kind not in MEASURES:
            return (
                f"Unavailable: this version of outliers has no `{kind}` measure, so the page has no such section's "
                "numbers."
            )
        if kind not in self.cfg.measure:
            return "Not asked for: this profile was run without this section (`--sections`)."
        if (err := self.error(kind)) and not len(self.rows(kind)):
            return f"Unavailable for this model: the analysis could not run ({err})."
        if not len(self.rows(kind)):
            return "Not computed yet: the run stopped before this section. Run the same command again to resume."
        return None


# ---------------------------------------------------------------------------------------------------- numbers in words


def num(v: Any, digits: int = 3) -> str:
    """A number as a reader wants it: 23,000 and 1,234 with separators, 0.0123 and 12.3 to ``digits``
    significant digits; '-' for None or NaN."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    if math.isinf(v):
        return "∞" if v > 0 else "-∞"
    if abs(v) >= 10 ** (digits - 1) or v == int(v) and abs(v) >= 1:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def pct(v: Any, digits: int = 3) -> str:
    """A fraction as a percentage (0.5 -> '50 %')."""
    return "-" if v is None else f"{num(100 * float(v), digits)} %"


def interval(ci: Any, fmt: str = "") -> str:
    """``[+1.8, +2.9]`` (default: one decimal, or two significant digits for changes under 0.1); '' for none."""
    if not ci or any(x is None or (isinstance(x, float) and math.isnan(x)) for x in ci):
        return ""
    fmt = fmt or ("+.1f" if max(abs(ci[0]), abs(ci[1])) >= 0.1 else "+.2g")
    return f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def change(v: Any, ci: Any = None) -> str:
    """``+2.3 % [+1.8, +2.9]``: a change in percent with its interval, as precise as its size asks."""
    if v is None:
        return "-"
    fmt = "+.1f" if abs(v) >= 0.1 else "+.2g"
    return f"{v:{fmt}} % {interval(ci)}".rstrip()


def _measured(m: dict[str, Any] | None, corpus: str) -> str:
    """``Measured on 4 windows of 512 tokens of `builtin` (2,048 tokens), bos corpus.``"""
    if not m:
        return ""
    if "weights" in m:
        return (
            f"Measured on the weights alone: {num(m.get('layers'))} linear layers, {num(m.get('values'))} values "
            f"({m['weights']}); the corpus is not read."
        )
    windows = m.get("windows")
    return (
        f"Measured on {num(windows)} window{'s' if windows != 1 else ''} of {num(m.get('window'))} tokens of "
        f"`{corpus}` ({num(m.get('tokens'))} tokens), bos {m.get('bos', 'corpus')}."
    )


def _cost(result: dict[str, Any] | None) -> str:
    c = (result or {}).get("cost")
    if not c:
        return ""
    return f"Computed in {c['wall_s']:.1f} s wall ({c['cpu_s']:.1f} s CPU) on {c.get('at', 'an earlier run')}."


def _figures(result: dict[str, Any], part: str | None = None) -> list[page.Figure]:
    """The cell's figures (those of one ``part`` of the page, where one cell feeds several sections)."""
    return [
        page.Figure(base64.b64decode(f["png"]), f["alt"], f["alt"])
        for f in result.get("figures") or []
        if part is None or f.get("part") == part
    ]


# ---------------------------------------------------------------------------------------------------- sections

Rendered = tuple[list[Any], list[page.Section]]  # the section's blocks, then its subsections


def _from_report(blocks: Sequence[Any]) -> Rendered:
    """A study measure's report blocks (``studies.measures``: Markdown lines, ``Table``, ``Image``) as page
    blocks: its first heading becomes a line under the section's own, later ones subsections; CSV-only tables
    stay out."""
    from .measures import Image, Table

    main: list[Any] = []
    subs: list[page.Section] = []
    into = main
    headed = False
    for block in blocks:
        if isinstance(block, Table):
            if not block.csv_only:
                into.append(page.Table(block.frame, floatfmt=block.floatfmt))
            continue
        if isinstance(block, Image):
            into.append(page.Figure(block.figure, block.alt))
            continue
        for line in str(block).split("\n"):
            if line.startswith(("## ", "### ")):
                title = line.split(" ", 1)[1]
                if not headed:
                    main.append(title[0].upper() + title[1:] + ".")
                    headed = True
                else:
                    subs.append(page.Section(title, [], level=3))
                    into = subs[-1].blocks  # type: ignore[assignment]
            elif line.strip():
                into.append(line.removeprefix("- "))
    return main, subs


def _facts(cells: ProfileCells) -> Rendered:
    r = cells.one("profile_facts")
    if r is None:
        return [cells.missing("profile_facts") or ""], []
    info, config = r["info"], r["config"]
    prov = _provenance_of(cells)
    model = pd.DataFrame(
        [
            ("model", info["name"]),
            ("architecture", f"{info['architecture']} ({info['model_class']}, {info['kind']})"),
            ("parameters", f"{num(info['n_params'])} ({info['n_params'] / 1e6:.1f} M, tied weights once)"),
            *[(k.replace("_", " "), v) for k, v in config.items()],
            ("weights", info.get("weights") or "unknown"),
            ("weights SHA-256", info.get("weights_sha256") or "unknown"),
            ("revision", info.get("revision") or ""),
            ("dtype, device", f"{info['dtype']}, {info['device']}"),
            ("source", info.get("source") or ""),
        ],
        columns=["fact", "value"],
    ).astype(str)
    corpus = pd.DataFrame(
        [
            ("corpus", cells.cfg.corpora[0]),
            ("corpus SHA-256", prov.get("corpus_sha256") or "unknown"),
            ("tokens", num(r["corpus_tokens"])),
            ("token ids SHA-256", prov.get("token_ids_sha256") or "unknown"),
            ("tokenizer", r["tokenizer"]),
            ("window, batch", f"{r['window']} tokens, {r['batch_size']} windows per batch"),
            (
                "bos",
                "each window starts with the BOS token"
                if r["bos"] == "window"
                else "as the corpus is (no BOS added to the windows)",
            ),
        ],
        columns=["fact", "value"],
    ).astype(str)
    blocks: list[Any] = [
        "What was measured and with what. Each section below says how many windows and tokens its numbers "
        "come from; its intervals are 95 % bootstrap intervals over windows.",
        page.Table(model, caption="The model"),
        page.Table(corpus, caption="The corpus"),
    ]
    return blocks, []


def _features(cells: ProfileCells) -> Rendered:
    r = cells.one("profile_scan")
    if r is None:
        return [cells.missing("profile_scan") or ""], []
    d = r["data"]
    c = d["criteria"]
    rows = [
        {
            "criterion": s["criterion"],
            "outlier dims": s["outlier_dims"],
            "mean % layers": s["pct_layers"],
            "mean % positions": s["pct_positions"],
            "tokens": s["tokens"],
        }
        for s in d["summary"].values()
    ]
    blocks: list[Any] = [
        _measured(r.get("measured_on"), cells.cfg.corpora[0]),
        f"A hidden dim is an outlier feature under the paper's criterion ({PAPER}, §4.1) when "
        f"|x| >= {d['threshold']:g} in >= {100 * c['layers']:g} % of the blocks and >= {100 * c['positions']:g} % "
        "of the token positions, at the inputs of attention and the FFN; the relative criterion asks "
        f"|x| >= {d['relative_k']:g} x the token's RMS instead, for models whose ordinary dims are not within "
        "about ±3.5.",
        page.Table(pd.DataFrame(rows), caption="Outlier features under both criteria", floatfmt=".1f"),
        page.Html(r["html"]),
    ]
    for scale in ("absolute", "relative"):
        found = pd.DataFrame(d["features"][scale])
        n = d["n_features"][scale]
        if n > (10 if scale == "absolute" else 0):  # up to 10 absolute ones are in the scan's own table above
            shown = f" (the {len(found)} largest)" if n > len(found) else ""
            blocks.append(page.Table(found, caption=f"Outlier features, {scale} criterion: {n}{shown}", floatfmt=".2f"))
    blocks += _figures(r, "features")
    blocks.append(_cost(r))
    return blocks, []


def _massive(cells: ProfileCells) -> Rendered:
    r = cells.one("profile_scan")
    if r is None:
        return [cells.missing("profile_scan") or ""], []
    d = r["data"]
    massive = pd.DataFrame(d["massive"], columns=["layer", "dim", "count", "max_abs"])
    blocks: list[Any] = [
        _measured(r.get("measured_on"), cells.cfg.corpora[0]),
        "Massive activations (Sun et al. 2024, arXiv 2402.17762): (block, dim) pairs of the residual stream (each "
        "block's output) where some token's |x| is above 100 and above 1000 x the median |x| of its hidden state. "
        "count: the tokens where it is.",
    ]
    if len(massive):
        dims = (
            massive.groupby("dim")
            .agg(
                first_block=("layer", "min"),
                last_block=("layer", "max"),
                blocks=("layer", "nunique"),
                max_abs=("max_abs", "max"),
            )
            .reset_index()
            .sort_values("max_abs", ascending=False)
        )
        blocks += [
            page.Table(dims.rename(columns=lambda x: x.replace("_", " ")), caption="Per dim", floatfmt=".1f"),
            page.Table(massive.rename(columns={"max_abs": "max |x|"}), caption="Per (block, dim)", floatfmt=".1f"),
        ]
    else:
        blocks.append("None: no block output of this model has a massive activation on these tokens.")
    tops = pd.DataFrame(d.get("top_values") or [])
    if len(tops):
        blocks.append(page.Table(tops, caption="The largest |x| seen and the tokens that carry them", floatfmt=".1f"))
    blocks += _figures(r, "massive")
    blocks.append("The same scan as the outlier features: its cost is theirs.")
    return blocks, []


def _kurtosis(cells: ProfileCells) -> Rendered:
    r = cells.one("profile_scan")
    if r is None:
        return [cells.missing("profile_scan") or ""], []
    q = r["data"]["quantizability"]
    layers = pd.DataFrame(r["data"]["layers"]).rename(columns={"layer": "block"})
    token = ", ".join(f"{k} {num(v)}" for k, v in (q.get("token_kurtosis") or {}).items())
    blocks: list[Any] = [
        _measured(r.get("measured_on"), cells.cfg.corpora[0]),
        "Bondarenko et al. 2023 (arXiv 2306.12929): per block output, each sequence's ∞-norm (largest |x|) and "
        "the kurtosis of all its values (Pearson's: a normal distribution has 3), averaged over sequences. Token "
        "kurtosis: per token across dims, at the inputs the quantizer sees.",
        f"Largest mean ∞-norm {num(q.get('max_inf_norm'))} at block {q.get('max_inf_norm_layer')}; mean kurtosis "
        f"of the block outputs {num(q.get('avg_kurtosis'))}; mean token kurtosis: {token}.",
        page.Table(layers, caption="Per block", floatfmt=".1f"),
    ]
    blocks += _figures(r, "kurtosis")
    blocks.append("The same scan as the outlier features: its cost is theirs.")
    return blocks, []


def _analysis(kind: str, extra: str = "") -> Any:
    """A profile cell's section: measured on, the analysis' own ``_repr_html_``, its figures, its cost."""

    def render(cells: ProfileCells) -> Rendered:
        r = cells.one(kind)
        if r is None:
            return [cells.missing(kind) or ""], []
        blocks: list[Any] = [_measured(r.get("measured_on"), cells.cfg.corpora[0])]
        if extra:
            blocks.append(extra)
        blocks += [page.Html(r["html"]), *_figures(r)]
        return blocks + _tables(kind, r) + [_cost(r)], []

    return render


def _tables(kind: str, r: dict[str, Any]) -> list[Any]:
    """The tables a section adds beside the analysis' own ``_repr_html_``."""
    if kind == "profile_range" and r.get("blocks"):
        return [page.Table(pd.DataFrame(r["blocks"]), caption="max |x| per block and kind of point", floatfmt=".4g")]
    if kind == "profile_sensitivity" and r.get("units"):
        units = pd.DataFrame(r["units"])
        keep = [
            c
            for c in (
                "unit",
                "rank",
                "kl_vs_ref",
                "kl_lo",
                "kl_hi",
                "delta_ppl_pct",
                "delta_lo",
                "delta_hi",
                "kl_share",
                "top1_agreement",
            )
            if c in units
        ]
        return [page.Table(units[keep], caption="Every unit, in forward order", floatfmt=".4g")]
    return []


def _study_measure(kind: str) -> Any:
    """A study measure's section: measured on, its own report blocks (``Measure.report``)."""

    def render(cells: ProfileCells) -> Rendered:
        from .measures import MEASURES

        if (why := cells.missing(kind)) is not None:
            return [why], []
        rows = cells.rows(kind)
        main, subs = _from_report(MEASURES[kind].report(rows, cells.cfg))
        if kind == "perplexity" and len(cells.cfg.thresholds) < 2:  # one threshold: no curve to draw
            subs = [s for s in subs if not s.title.startswith("Perplexity vs threshold")]
        r = rows.result.iloc[-1]
        blocks = [_study_measured(kind, rows, cells), *main, *_study_tables(kind, r)]
        cost = _cost(r) if len(rows) == 1 else _costs(rows)
        return [*blocks, cost], subs

    return render


def _costs(rows: pd.DataFrame) -> str:
    costs = [r.get("cost") for r in rows.result if r.get("cost")]
    if not costs:
        return ""
    wall, cpu = sum(c["wall_s"] for c in costs), sum(c["cpu_s"] for c in costs)
    return f"Computed in {wall:.1f} s wall ({cpu:.1f} s CPU) over {len(costs)} cells."


def _study_measured(kind: str, rows: pd.DataFrame, cells: ProfileCells) -> str:
    corpus = cells.cfg.corpora[0]
    r = rows.result.iloc[-1]
    if kind == "perplexity":
        base = rows[rows.method == "fp32"]
        b = base.result.iloc[-1] if len(base) else r
        return (
            _measured(
                {
                    "windows": b.get("n_windows"),
                    "window": cells.cfg.window,
                    "tokens": b.get("n_tokens"),
                    "bos": cells.cfg.bos,
                },
                corpus,
            )
            + " Every row is scored on the same windows as fp32; its change against fp32 is paired."
        )
    if kind == "superweights":
        return _measured(
            {
                "windows": r.get("n_windows"),
                "window": r.get("window"),
                "tokens": r.get("n_tokens"),
                "bos": cells.cfg.bos,
            },
            corpus,
        ).replace("Measured on", "Perplexities on")
    if kind == "lifecycle":
        return _measured(
            {
                "windows": r.get("n_windows"),
                "window": cells.cfg.window,
                "tokens": r.get("n_tokens"),
                "bos": r.get("bos", cells.cfg.bos),
            },
            corpus,
        )
    return ""


def _study_tables(kind: str, r: dict[str, Any]) -> list[Any]:
    """Super weights: each candidate's verdict and every control, from the measure's result."""
    if kind != "superweights":
        return []
    out: list[Any] = []
    verdicts = r.get("verdicts") or []
    if verdicts:
        frame = pd.DataFrame(
            [
                {
                    "block": v.get("block"),
                    "row": v.get("row"),
                    "col": v.get("col"),
                    "value": v.get("value"),
                    "verdict": v.get("verdict"),
                    "Δppl % zeroed": v.get("delta_ppl_pct"),
                    "95 % interval": interval(v.get("delta_ppl_pct_ci95")),
                }
                for v in verdicts
            ]
        )
        out.append(page.Table(frame, caption="The spike rule's candidates and their verdicts", floatfmt=".4g"))
    elif r.get("first") is None:
        out.append("The spike rule finds no candidate in this model: no down projection has the spike it asks for.")
    controls = r.get("controls") or []
    if controls:
        frame = pd.DataFrame(
            [
                {
                    "control": c.get("name"),
                    "weights zeroed": c.get("n_weights"),
                    "ppl": c.get("ppl"),
                    "Δppl %": c.get("delta_ppl_pct"),
                    "95 % interval": interval(c.get("delta_ppl_pct_ci95")),
                    "in massive dims": c.get("n_in_massive"),
                    "matched seeds (min, median, max Δppl %)": _spread(c.get("spread")),
                    "note": c.get("note") or "",
                }
                for c in controls
            ]
        )
        out.append(page.Table(frame, caption="Controls: other weights zeroed instead", floatfmt=".4g"))
    return out


def _spread(s: dict[str, Any] | None) -> str:
    if not s:
        return ""
    return ", ".join(f"{s[k]:+.1f}" for k in ("min", "median", "max") if s.get(k) is not None)


RENDER = {
    "facts": _facts,
    "features": _features,
    "massive": _massive,
    "kurtosis": _kurtosis,
    "sinks": _analysis(
        "profile_sinks",
        "Gu et al. 2024 (arXiv 2410.10781): a head is a sink when its mean attention to its window's first token "
        "exceeds ε; the map shows every head's score. Local sliding-window layers are left out of the rate.",
    ),
    "superweights": _study_measure("superweights"),
    "lifecycle": _study_measure("lifecycle"),
    "weights": _analysis("profile_weights"),
    "kvcache": _analysis(
        "profile_kvcache",
        "KIVI and KVQuant: keys have fixed outlier channels (quantize them per channel, before RoPE), values do "
        "not (per token).",
    ),
    "range": _analysis(
        "profile_range",
        "How far the activations sit from float16's and bfloat16's largest value, what FP8 loses below its "
        "smallest subnormal, and whether a run with every activation rounded to float16 stays finite.",
    ),
    "sensitivity": _analysis(
        "profile_sensitivity",
        "Each unit quantized alone, the rest in float: its KL against the float model with a paired interval, "
        "the ranking's stability between even and odd windows, and the cheap predictors' agreement with it.",
    ),
    "table1": _study_measure("perplexity"),
}


def render_sections(cells: ProfileCells, sections: Sequence[ProfileSection]) -> list[page.Section]:
    """The page's sections, in order, each followed by its subsections."""
    out: list[page.Section] = []
    for s in sections:
        blocks, subs = RENDER[s.key](cells)
        out.append(page.Section(s.title, tuple(b for b in blocks if b), anchor=s.key, level=s.level))
        out += subs
    return out


# ---------------------------------------------------------------------------------------------------- summary


def summary_sentences(cells: ProfileCells) -> list[str]:
    """What a reader should take away, in sentences made from the numbers, each saying what it was measured on."""
    out: list[str] = []
    scan = cells.one("profile_scan")
    sw = cells.one("superweights")
    if scan:
        d = scan["data"]
        n, tokens = d["n_features"]["absolute"], num(scan["measured_on"]["tokens"])
        feats = d["features"]["absolute"]
        if n:
            f = feats[0]
            first = (
                f"dim {f['dim']} in {num(f['pct_layers'])} % of blocks and {num(f['pct_positions'])} % of positions, "
                f"max |x| {num(f['max_abs'])}"
            )
            others = f"; dims {', '.join(str(x['dim']) for x in feats[1:6])}" if n > 1 else ""
            out.append(
                f"{_count(n, 'outlier feature')} under the paper's criterion ({first}{others}) and "
                f"{d['n_features']['relative']} under the relative one, on {tokens} tokens."
            )
        else:
            out.append(
                f"No outlier feature under the paper's criterion (|x| >= {d['threshold']:g} in >= 25 % of blocks and "
                f">= 6 % of positions) and {d['n_features']['relative']} under the relative one, on {tokens} tokens."
            )
        massive = pd.DataFrame(d["massive"], columns=["layer", "dim", "count", "max_abs"])
        if len(massive):
            top = massive.loc[massive.max_abs.idxmax()]
            dim = int(top.dim)
            born = int(massive[massive.dim == dim].layer.min())
            origin = _origin(sw, dim)
            outputs = int((massive.dim == dim).sum())
            out.append(
                f"A massive activation of {num(top.max_abs)} in dim {dim} from block {born} on, in "
                f"{_count(outputs, 'block output').lower()}{origin}; on {tokens} tokens."
            )
        else:
            out.append(f"No massive activation (|x| > 100 and > 1000 x the median) on {tokens} tokens.")
        q = d["quantizability"]
        if q.get("max_inf_norm") is not None:
            out.append(
                f"Block outputs (per sequence, averaged over sequences, as Bondarenko et al. 2023): largest ∞-norm "
                f"{num(q['max_inf_norm'])} at block {q['max_inf_norm_layer']}, mean kurtosis "
                f"{num(q['avg_kurtosis'])} (a normal distribution has 3), on {tokens} tokens."
            )
    if sw and not scan:
        out.append("Super weights: " + _origin(sw, None).lstrip(", ") + ".")
    sinks = cells.one("profile_sinks")
    if sinks:
        s, m = sinks["data"], sinks["measured_on"]
        out.append(
            f"Attention sinks: {pct(s['sink_rate'])} of heads ({s['n_sink_heads']} of {s['n_counted_heads']}) put more "
            f"than {s['epsilon']:g} of their attention on the first token, on {num(m['windows'])} windows of "
            f"{num(m['window'])} tokens."
        )
    ppl = cells.rows("perplexity")
    if len(ppl):
        out += _table1_sentences(ppl, cells.cfg)
    sens = cells.one("profile_sensitivity")
    if sens:
        d, units = sens["data"], {u["unit"]: u for u in sens["data"]["units"]}
        if d.get("ranking"):
            u = units[d["ranking"][0]]
            rho = d.get("spearman_halves")
            stable = f"; the ranking's ρ between halves {num(rho, 2)}" if rho is not None else ""
            out.append(
                f"Most sensitive {d['unit']} under {d['method']}: {u['unit']}, KL {num(u['kl_vs_ref'])} "
                f"{interval(u.get('kl_vs_ref_ci95'), '.3g')} nats/token, {pct(u.get('kl_share'), 2)} of the whole "
                f"model's KL{stable}; on {num(d['n_windows'])} windows of {num(d['window'])} tokens."
            )
    kv = cells.one("profile_kvcache")
    if kv:
        s = kv["data"]["summary"]
        keys, values = s.get("keys", {}), s.get("values", {})
        out.append(
            f"Key cache: keys have outlier channels in {pct(keys.get('layers_with_outliers'))} of layers (median "
            f"concentration {num(keys.get('median_concentration'))} x), values in "
            f"{pct(values.get('layers_with_outliers'))}, on {num(kv['measured_on']['tokens'])} tokens."
        )
    rng = cells.one("profile_range")
    if rng:
        d = rng["data"]
        top, emu = d["summary"]["max_abs"], d.get("emulated_float16") or {}
        margin = math.log2(d["formats"]["float16"]["max"] / top["value"]) if top["value"] else math.inf
        run = (
            ("stays finite" if emu.get("clean") else f"overflows first at {_where(emu.get('first_nonfinite'))}")
            if emu
            else "was not run"
        )
        out.append(
            f"Number formats: largest |x| {num(top['value'])} at {top['point']}, {margin:+.1f} bits of headroom to "
            f"float16's largest value; a run in emulated float16 {run}, on {num(d['n_tokens'])} tokens."
        )
    weights = cells.one("profile_weights")
    if weights:
        s = weights["data"]["summary"]
        if s.get("n_layers"):
            out.append(
                f"Weights of the {s['n_layers']} linears a quantizer replaces: largest |w| {num(s['max_abs'])} in "
                f"{s['max_abs_layer']}, mean kurtosis {num(s['mean_kurtosis'])}, {pct(s['beyond_6sigma'], 2)} of "
                "them beyond 6 σ of their layer."
            )
    return out


def _count(n: int, what: str) -> str:
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    return f"{words.get(n, str(n))} {what}{'s' if n != 1 else ''}".capitalize()


def _where(loc: dict[str, Any] | None) -> str:
    if not loc:
        return "an unknown place"
    return f"block {loc['block']} {loc['tensor']}" if loc.get("block") is not None else f"the head ({loc['tensor']})"


def _origin(sw: dict[str, Any] | None, dim: int | None) -> str:
    """Where the super weights say the massive activation comes from: ', born from one weight (...)'."""
    if not sw:
        return ""
    first = sw.get("first")
    if not first:
        return ", with no super-weight candidate by the spike rule"
    verdicts = sw.get("verdicts") or []
    coord = f"block {first['block']}, row {first['row']}, col {first['col']}"
    ratio = sw.get("ratio_zeroed")
    effect = f"; zeroed, perplexity x{num(ratio)}" if ratio else ""
    verdict = ""
    if verdicts:
        n = sum(v.get("verdict") == "super_weight" for v in verdicts)
        verdict = f"; {n} of {len(verdicts)} candidates pass the matched control"
    same = dim is None or first.get("row") == dim
    what = "born from one weight" if same and len(verdicts) <= 1 else "with a super-weight candidate"
    windows = f" on {sw.get('n_windows')} windows" if sw.get("n_windows") else ""
    return f", {what} ({coord}{effect}{verdict}{windows})"


def _table1_sentences(ppl: pd.DataFrame, cfg: StudyConfig) -> list[str]:
    from outliers.quant.methods import label

    base = ppl[ppl.method == "fp32"]
    quant = ppl[(ppl.method != "fp32") & ~ppl.method.str.contains("@", regex=False)]
    if not len(base) or not len(quant):
        return []
    b = base.result.iloc[-1]
    windows = f"{b.get('n_windows')} windows of {cfg.window} tokens"
    parts = []
    for _, row in quant.iterrows():
        r = row.result
        if r.get("delta_ppl_pct") is None:
            continue
        parts.append((r["delta_ppl_pct"], label(row.method), r.get("delta_ppl_pct_ci95")))
    if not parts:
        return []
    parts.sort()
    int8 = [p for p in parts if p[1].startswith("absmax LLM.int8()")]
    shown = int8[:1] + [p for p in (parts[0], parts[-1]) if p not in int8[:1]]
    text = "; ".join(f"{name} at {change(d, ci)}" for d, name, ci in shown)
    return [f"Perplexity against fp32 ({num(b.get('ppl'), 4)}), {windows}: {text}."]


# ---------------------------------------------------------------------------------------------------- provenance


def _provenance_of(cells: ProfileCells) -> dict[str, Any]:
    rows = cells.current
    if not len(rows):
        return {}
    return dict(rows.provenance.iloc[-1] or {})


def provenance(cells: ProfileCells, command: str) -> list[tuple[str, Any]]:
    """The page's header: the weights, dtype, corpus and its SHA-256, the code that computed the cells."""
    import outliers

    rows = cells.current
    p = _provenance_of(cells)
    facts = cells.one("profile_facts") or {}
    info = facts.get("info") or {}
    commits = sorted(
        {(c or "unknown")[:10] + ("+dirty" if d else "") for c, d in zip(rows.commit_sha, rows.dirty, strict=True)}
    )
    versions = sorted(set(rows.version)) if len(rows) else []
    corpus = cells.cfg.corpora[0]
    tokens = facts.get("corpus_tokens")
    return [
        ("model", cells.cfg.models[0]),
        ("weights", p.get("weights") or info.get("weights")),
        ("weights SHA-256", p.get("weights_sha256") or info.get("weights_sha256")),
        ("revision", p.get("revision")),
        ("dtype", cells.cfg.dtype),
        ("corpus", f"`{corpus}`" + (f", {num(tokens)} tokens" if tokens else "")),
        ("corpus SHA-256", p.get("corpus_sha256")),
        ("windows", f"{cells.cfg.window} tokens each, bos {cells.cfg.bos}; each section gives its count"),
        (
            "computed by",
            f"outliers {', '.join(versions) or outliers.__version__} (commit {', '.join(commits) or 'unknown'})",
        ),
        (
            "with",
            f"torch {p.get('torch', '?')}, transformers {p.get('transformers', '?')}, Python {p.get('python', '?')}, "
            f"{p.get('machine', platform.machine())}",
        ),
        ("page written", f"{time.strftime('%Y-%m-%d %H:%M')} by outliers {outliers.__version__}"),
        ("command", f"`{command}`" if command else ""),
    ]


def _cost_table(cells: ProfileCells, sections: Sequence[ProfileSection], costs: Sequence[SectionCost]) -> page.Table:
    by_key = {c.key: c for c in costs}
    rows = []
    for s in sections:
        kinds = [m for m in s.measures if m in cells.cfg.measure]
        stored = [r for k in kinds for r in cells.rows(k).result]
        spent = [r["cost"] for r in stored if r.get("cost")]
        c = by_key.get(s.key)
        rows.append(
            {
                "section": s.title,
                "cells": len(stored),
                "wall s": sum(x["wall_s"] for x in spent) if spent else math.nan,
                "CPU s": sum(x["cpu_s"] for x in spent) if spent else math.nan,
                "this run": (
                    "unavailable"
                    if c is not None and not c.available
                    else f"{c.computed} computed, {c.stored} stored" + (f", {c.failed} failed" if c.failed else "")
                    if c is not None
                    else ""
                ),
            }
        )
    return page.Table(
        pd.DataFrame(rows),
        caption="What each section's cells cost when they were computed (the scan's three sections share one cell)",
        floatfmt=".1f",
    )


def write_pages(
    out: Path,
    cfg: StudyConfig,
    planned: Sequence[PlannedCell],
    frame: pd.DataFrame,
    sections: Sequence[ProfileSection],
    *,
    costs: Sequence[SectionCost] = (),
    command: str = "",
) -> Path:
    """Write ``index.html`` and ``profile.json`` into ``out``; return the page's path."""
    from outliers.cache import atomic_write

    cells = ProfileCells.of(cfg, planned, frame)
    body = render_sections(cells, sections)
    summary = summary_sentences(cells)
    head = provenance(cells, command)
    settings = as_tables(cfg)["study"]
    how = page.Section(
        "How this page was made",
        (
            "Every section is a cell of a study kept in this folder's `results.sqlite`: rerunning the command "
            "computes only the cells missing or stale (their weights, corpus, settings or code changed); "
            "`studies status` reads the folder.",
            _cost_table(cells, sections, costs),
            "The study's settings, as `studies run` takes them:",
            page.Code(
                "[study]\n" + "\n".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items())
            ),
        ),
        anchor="how",
    )
    model = cfg.models[0]
    quick = "(quick)" in cfg.description
    title = f"Outlier profile: {model}"
    subtitle = f"on `{cfg.corpora[0]}`" + (" · quick: fewer windows, rough intervals" if quick else "")
    index = page.write_page(
        out / "index.html",
        title,
        [*body, how],
        summary=[page.Bullets(tuple(summary))] if summary else ["No section has its numbers yet."],
        provenance=head,
        subtitle=subtitle,
    )
    data = {
        "model": model,
        "corpus": cfg.corpora[0],
        "quick": quick,
        "summary": summary,
        "provenance": {k: v for k, v in head if v},
        "settings": settings,
        "sections": {
            s.key: {
                "title": s.title,
                "cells": [
                    {
                        "kind": row.kind,
                        "method": row.method,
                        "threshold": None if pd.isna(row.threshold) else row.threshold,
                        "result": {k: v for k, v in row.result.items() if k not in ("html", "figures")},
                    }
                    for k in s.measures
                    for row in cells.rows(k).itertuples()
                ],
                "missing": next((w for k in s.measures if (w := cells.missing(k))), None),
            }
            for s in sections
        },
    }
    atomic_write(out / "profile.json", json.dumps(data, indent=1, default=str) + "\n")
    return index
