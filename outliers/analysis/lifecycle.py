"""The outlier lifecycle of one model, traced by causal edits: super weight → massive activation → attention
sinks → key channels → quantization error.

The literature since 2024 describes one chain ("Systematic outliers", ICLR 2025, calls it a lifecycle): a few
super weights in an early down projection multiply a large input into a massive activation of one residual
dim on one or a few tokens (Yu et al. 2024, arXiv 2411.07191; Sun et al. 2024, arXiv 2402.17762); that
activation makes later heads attend to those tokens, the attention sinks (Xiao et al. 2023; Gu et al. 2024,
arXiv 2410.10781), and shapes the key channels (KIVI; KVQuant); quantization fails where these values sit.
``trace`` measures each link on the chosen text and then edits the cause and measures the effects.

**Detection** (before any edit, on the unedited model):

- super weights by the spike rule of ``outliers.analysis.superweights`` (``detect_windows`` windows);
- massive activations: one forward over the trace windows flags each (window, position, block) by Sun et al.'s
  criterion (``outliers.quant.prefix.outlier_flags``, the one ``outliers tokens`` lists), and hooks beside it
  keep each flagged position's argmax dim per block. A block is *token-specific* when it flags at most
  ``max_token_share`` of the positions; in the others a dim is large on most tokens (a massive *dimension*,
  listed apart as ``widespread``). A massive dim is the argmax dim of flagged positions in token-specific
  blocks; its *birth block* the first such block; its *tokens* the positions flagged with it from there on.

**One pass per edit** (``outliers.analysis.lifecycle_edits``: ``none``, ``zero_super_weights``,
``restore_super_activation``, ``clamp_massive``, ``clamp_control``) over the same windows, the float model in
eager attention, every quantity measured at once by hooks that reduce what they see per window as it passes:

- ``massive_activation``: per window and block the largest ``|h|`` in the massive dim(s) on the massive tokens
  (the unedited model's), averaged over the blocks where the unedited model carries it (birth to last flagged
  block) and over windows (``massive_at_birth``: at the birth block's output alone, where the clamp acts;
  ``massive_dim_max``: the largest in the massive dim on any token and block of that span; ``max_activation``:
  the same in any dim; ``massive_by_block``, ``massive_dim_max_by_block``: per block, without an interval);
- ``sink_rate``, ``first_token_attention``: per head the mean over queries of the attention weight on the
  window's first token, averaged over windows (``outliers.analysis.sinks``' score); the share of heads above
  ``epsilon`` and the mean over heads (sliding-window layers that cannot see the first token left out);
  ``massive_token_attention``: the same for the attention mass on the massive tokens;
- ``key_concentration``: per layer the top key channel's max ``|k|`` over the median channel's, the projected
  keys (pre-RoPE) as ``outliers kvcache`` measures them, median over layers;
- ``ppl``: the edited float model's perplexity (chunks of ``window``, ``outliers.eval.perplexity``);
- ``kl_vs_ref_<row>``: each quantized row (``llm.int8`` by default) made from the *edited* float model and
  scored against it as the reference on the same windows (``outliers.eval.rows``): how much error the
  quantization adds to the model as edited, so that an edit that removes the outliers the row struggles with
  lowers it. A weight edit is in the quantized copy (it is made inside the edit); hooks go on both models.

Every change against ``none`` comes with a paired 95 % percentile interval, windows resampled with replacement
(the same resamples for every edit and field; 2000, seeded): ``<field>_delta``, ``<field>_delta_ci95``. Maxima
(the key concentration) are taken over the resampled windows. Few windows give rough intervals.

The chain also reports the share of each row's KL that falls on the massive tokens (the KL of the prediction
made at that position), against their share of the tokens, with intervals.

Where the parts live: the edits in ``lifecycle_edits``, the detection and one pass's hooks in
``lifecycle_record``, the fields and intervals in ``lifecycle_stats``, the diagram in ``lifecycle_plots``; this
module runs the passes and writes the result.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from outliers.analysis.lifecycle_edits import EDITS, RESTORE_FRACTION, Edit, plan_edits, recording
from outliers.analysis.lifecycle_record import Detection, Pass, Recorder, counted_heads, detect
from outliers.analysis.lifecycle_stats import FIELDS, edit_stats, interval, kl_share, resamples, row_field
from outliers.analysis.scan import cut_windows
from outliers.analysis.sinks import eager_attention, local_layers
from outliers.analysis.superweight_controls import ControlSettings
from outliers.analysis.superweights import SuperWeightResult, super_weights
from outliers.display import fmt_interval, named, provenance, render_html
from outliers.errors import InvalidArgumentError
from outliers.eval.intervals import delta_ppl_pct_interval, few_windows_note
from outliers.eval.perplexity import perplexity
from outliers.eval.rows import Row, RowEvaluator
from outliers.eval.windows import PerplexitySettings
from outliers.quant.methods import get_method

__all__ = ["TraceSettings", "TraceResult", "trace", "FIELDS", "row_field"]


@dataclass(frozen=True)
class TraceSettings:
    """How ``trace`` runs. ``window``, ``max_windows``: the windows every pass reads (chunks from the text's
    start); ``detect_windows``: the first ones super-weight detection reads; ``rows``: the quantized rows whose
    KL is measured (method names, ``outliers.quant.methods``); ``max_token_share``: a block is token-specific
    when it flags at most this share of positions; ``seed``: the control dims."""

    window: int = 256
    max_windows: int = 8
    detect_windows: int = 2
    batch_size: int = 4
    epsilon: float = 0.3
    k: float = 4.0
    rows: tuple[str, ...] = ("llm.int8",)
    edits: tuple[str, ...] = EDITS
    restore_fraction: float = RESTORE_FRACTION
    seed: int = 0
    jump: float = 50.0
    max_found: int = 4
    max_token_share: float = 0.05

    def check(self) -> None:
        """Raises InvalidArgumentError for a bad value, before any model runs."""
        if self.window < 3 or min(self.max_windows, self.detect_windows, self.batch_size, self.max_found) < 1:
            raise InvalidArgumentError(
                "window must be >= 3 and max_windows, detect_windows, batch_size, max_found >= 1; got "
                f"{self.window}, {self.max_windows}, {self.detect_windows}, {self.batch_size}, {self.max_found}"
            )
        if not 0 < self.epsilon < 1 or not self.k > 1 or not self.jump > 1:
            raise InvalidArgumentError(f"epsilon must be in (0, 1), k and jump > 1; got {self.epsilon}, {self.k}")
        if not 0 < self.restore_fraction <= 1 or not 0 < self.max_token_share < 1:
            raise InvalidArgumentError("restore_fraction must be in (0, 1] and max_token_share in (0, 1)")
        if "none" not in self.edits:
            raise InvalidArgumentError("the edits must include 'none': every change is measured against it")
        for method in self.rows:
            if method == "fp32":
                raise InvalidArgumentError("rows are quantization methods; the float model is scored anyway")
            get_method(method)
        plan_edits([], [], 1, names=self.edits)  # unknown edit names fail here


# ---------------------------------------------------------------------------------------------------- result


@dataclass
class TraceResult:
    """The chain (``chain``: what the unedited model shows, link by link) and the edits' effects (``edits``: one
    dict per edit with every field, its interval and its change against ``none``)."""

    chain: dict[str, Any]
    edits: list[dict[str, Any]]
    settings: TraceSettings
    n_windows: int
    bos: str  # "corpus" or "window", as the windows were cut
    cost: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> list[str]:
        return [*FIELDS, *(row_field(r) for r in self.settings.rows)]

    def edit(self, name: str) -> dict[str, Any]:
        """One edit's dict by name."""
        for e in self.edits:
            if e["edit"] == name:
                return e
        raise KeyError(name)

    def table(self) -> pd.DataFrame:
        """Edit × field: the value, and the change against ``none`` with its interval, as text."""
        rows = []
        for e in self.edits:
            row: dict[str, Any] = {"edit": e["edit"]}
            for f in self.fields():
                v = e.get(f)
                if v is None:
                    row[f] = "n/a" if not e["applicable"] else "-"
                    continue
                text = _num(v)
                if e["edit"] != "none" and e.get(f"{f}_delta") is not None:
                    text += f" ({_num(e[f'{f}_delta'], sign=True)} {fmt_interval(e[f'{f}_delta_ci95'], '.3g')})"
                row[f] = text
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """Every field for JSON, the ``meta`` facts first."""
        return {
            **self.meta,
            "settings": asdict(self.settings),
            "n_windows": self.n_windows,
            "bos": self.bos,
            "chain": self.chain,
            "edits": self.edits,
            "cost": self.cost,
        }

    def _repr_html_(self) -> str:
        return trace_html(self)


def _num(v: float, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = "+" if sign else ""
    return f"{v:{s}.4g}"


# ---------------------------------------------------------------------------------------------------- trace


def _chain(
    sw: SuperWeightResult,
    det: Detection,
    p: Pass,
    windows: torch.Tensor,
    settings: TraceSettings,
    local: set[int],
    weights: np.ndarray,
    tokenizer: Any,
) -> dict[str, Any]:
    """The unedited model's chain, link by link, from detection and the ``none`` pass."""
    rec = p.rec
    assert rec is not None
    ids = windows[det.positions]
    where = det.positions.nonzero().tolist()
    tokens = Counter(int(t) for t in ids.tolist())
    by_position = Counter(p_ for _, p_ in where)

    def text(t: int) -> str:
        return tokenizer.decode([t]) if tokenizer is not None else ""

    massive = []
    for m in det.massive:
        feeds = [list(w.coord) for w in sw.weights if w.row == m.dim]
        massive.append(asdict(m) | {"super_weights": feeds})
    down_in = []
    for b in rec.down_blocks:
        inside, outside = rec.down["massive"][b].max(0), rec.down["other"][b].max(0)
        c = int(inside.argmax())
        down_in.append(
            {
                "block": b,
                "channel": c,
                "max_abs_massive_tokens": float(inside[c]),
                "max_abs_other_tokens": float(outside[c]),
                "ratio": float(inside[c] / outside[c]) if outside[c] > 0 else math.inf,
                "super_weight_cols": [w.col for w in sw.weights if w.block == b],
            }
        )
    heads = []
    for layer in sorted(rec.attn_first):
        first, mass = rec.attn_first[layer].mean(0), rec.attn_massive[layer].mean(0)
        for h in range(len(first)):
            heads.append(
                {
                    "layer": layer,
                    "head": h,
                    "first_token": float(first[h]),
                    "massive_tokens": float(mass[h]),
                    "local": layer in local,
                }
            )
    frame = pd.DataFrame(heads, columns=["layer", "head", "first_token", "massive_tokens", "local"])
    counted = frame[~frame.local]
    sinks = counted[counted.massive_tokens > settings.epsilon]
    births = [m.birth_block for m in det.massive]
    keys = []
    for layer in sorted(rec.keys["all"]):
        a, ins, out = (rec.keys[k][layer].max(0) for k in ("all", "massive", "other"))
        med, med_other = float(np.median(a)), float(np.median(out))
        top = int(a.argmax())
        keys.append(
            {
                "layer": layer,
                "top_channel": top,
                "concentration": float(a[top] / med) if med > 0 else math.nan,
                "concentration_other_tokens": float(out.max() / med_other) if med_other > 0 else math.nan,
                "n_outliers": int((a >= settings.k * med).sum()) if med > 0 else 0,
                "n_outliers_on_massive_tokens": int((ins >= settings.k * med_other).sum()) if med_other > 0 else 0,
                "n_outliers_on_other_tokens": int((out >= settings.k * med_other).sum()) if med_other > 0 else 0,
                "top_on_massive_tokens": bool(ins[top] >= out[top]) and bool(det.positions.any()),
            }
        )
    kf = pd.DataFrame(keys)
    kl = {row: kl_share(p.token_kl[row], det.positions, weights) for row in p.token_kl}
    first_birth = min(births) if births else None
    return {
        "super_weights": [asdict(w) for w in sw.weights],
        "super_weight_rule": f"spike: a block's down-projection output max >= {sw.jump:g} x the median over blocks",
        "super_weight_stop": sw.stop,
        "massive": massive,
        "massive_tokens": [{"token_id": t, "token": text(t), "count": c} for t, c in tokens.most_common(10)],
        "massive_positions": {str(k): v for k, v in sorted(by_position.items())[:20]},
        "massive_token_share": float(det.positions.float().mean()),
        "windows_with_massive_tokens": int(det.positions.any(1).sum()),
        "flagged_share_per_block": det.flagged_share,
        "token_specific_blocks": [b for b, s in enumerate(det.specific) if s],
        "widespread": det.widespread,
        "prefixquant_blocks": det.prefixquant_blocks,
        "down_in": down_in,
        "sink_heads": sinks.to_dict(orient="records"),
        "n_sink_heads": len(sinks),
        "n_counted_heads": len(counted),
        "sink_heads_after_birth": int((sinks.layer > first_birth).sum()) if first_birth is not None else 0,
        "sink_layers": sorted({int(x) for x in sinks.layer}),
        "heads": frame.to_dict(orient="records"),
        "key_layers": keys,
        "key_concentration": float(kf.concentration.median()) if len(kf) else None,
        "key_concentration_other_tokens": float(kf.concentration_other_tokens.median()) if len(kf) else None,
        "key_layers_with_outliers": int((kf.n_outliers > 0).sum()) if len(kf) else 0,
        "key_layers_top_on_massive_tokens": int(kf.top_on_massive_tokens.sum()) if len(kf) else 0,
        "kl_share": kl,
    }


def _edit_dicts(
    passes: dict[str, Pass],
    settings: TraceSettings,
    counted: np.ndarray,
    span: tuple[int, int],
    n: int,
    fields: list[str],
) -> list[dict[str, Any]]:
    one = np.ones((1, n))
    weights = resamples(n)
    base = passes["none"]
    base_point, base_res = edit_stats(base, one, counted, settings.epsilon, span), None
    out = []
    for name in settings.edits if settings.edits else EDITS:
        if name not in passes:
            continue
        p = passes[name]
        d: dict[str, Any] = {"edit": name, "applicable": p.edit.applicable, "description": p.edit.describe()}
        if not p.edit.applicable:
            d |= {f: None for f in fields} | {"note": p.edit.note}
            d |= {f"{f}_delta": None for f in fields} | {f"{f}_delta_ci95": None for f in fields}
            out.append(d)
            continue
        point = edit_stats(p, one, counted, settings.epsilon, span)
        res = edit_stats(p, weights, counted, settings.epsilon, span) if n > 1 else {}
        if base_res is None and n > 1:
            base_res = edit_stats(base, weights, counted, settings.epsilon, span)
        for f in fields:
            if f not in point:
                d[f] = d[f"{f}_ci95"] = None
                if name != "none":
                    d[f"{f}_delta"] = d[f"{f}_delta_ci95"] = None
                continue
            d[f] = float(point[f][0])
            d[f"{f}_ci95"] = interval(res[f]) if res else None
            if name != "none":
                d[f"{f}_delta"] = float(point[f][0] - base_point[f][0])
                d[f"{f}_delta_ci95"] = interval(res[f] - base_res[f]) if res and base_res else None
        if p.nll is not None and p.tokens is not None and name != "none" and base.nll is not None:
            d["delta_ppl_pct"] = 100.0 * math.expm1((p.nll.sum() - base.nll.sum()) / p.tokens.sum())
            tokens = [int(t) for t in p.tokens]
            ci = delta_ppl_pct_interval(p.nll.tolist(), base.nll.tolist(), tokens) if n > 1 else None
            d["delta_ppl_pct_ci95"] = list(ci) if ci else None
        if p.rec is not None and p.rec.dims:  # where the activation is, block by block (mean over windows)
            d["massive_by_block"] = [float(x) for x in p.rec.resid_on_tokens.max(-1).mean(0)]
            d["massive_dim_max_by_block"] = [float(x) for x in p.rec.resid_peak.max(-1).mean(0)]
        d["float_columns_pct"] = p.float_columns_pct
        d["clamped_tokens"] = p.clamped_tokens
        d["seconds"] = p.seconds
        out.append(d)
    return out


def trace(
    model: nn.Module,
    ids: torch.Tensor,
    settings: TraceSettings | None = None,
    *,
    bos_token_id: int | None = None,
    tokenizer: Any = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> TraceResult:
    """Trace the outlier chain of a causal LM on ``ids`` and measure the edits' effects (module docstring).

    Windows are cut as ``outliers.analysis.scan`` cuts them (``bos_token_id``: each is that BOS and
    ``window - 1`` corpus tokens; super-weight detection reads the first ``detect_windows`` of the same
    windows). The model is unchanged on return, whatever happens. ``tokenizer`` names the massive tokens;
    ``meta`` (model facts) leads the result's ``to_dict``.

    Raises:
        InvalidArgumentError: bad settings, a family without blocks, attention, keys or a down projection in the
            registry, an attention that returns no probabilities.
        CorpusError: fewer tokens than one window.
    """
    settings = settings or TraceSettings()
    settings.check()
    started = time.perf_counter()
    windows, _ = cut_windows(ids, settings.window, bos_token_id=bos_token_id, max_windows=settings.max_windows)
    n = len(windows)
    d = min(settings.detect_windows, n)
    sw = super_weights(
        model,
        windows[:d].reshape(-1),  # the trace's own first windows, cut again as they are
        window=settings.window,
        max_windows=d,
        max_found=settings.max_found,
        jump=settings.jump,
        batch_size=settings.batch_size,
    )
    sw_seconds = time.perf_counter() - started
    det = detect(model, windows, settings.batch_size, settings.max_token_share, progress)
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is None:
        raise InvalidArgumentError("the model's config gives no hidden size")
    births = [(m.birth_block, m.dim) for m in det.massive]
    coords = [w.coord for w in sw.weights]
    edits = plan_edits(coords, births, int(hidden), seed=settings.seed, names=settings.edits)
    down_blocks = sorted({b for b, _ in births} | {c[0] for c in coords})
    n_blocks = len(det.flagged_share)
    span = (
        min((m.birth_block for m in det.massive), default=0),
        max((m.last_block for m in det.massive), default=n_blocks - 1),
    )
    local = local_layers(model, settings.window)
    ppl_settings = PerplexitySettings(
        window=settings.window,
        max_windows=n,
        batch_size=settings.batch_size,
        bos="corpus" if bos_token_id is None else "window",
    )
    store: dict = {}
    passes: dict[str, Pass] = {}
    # the order shares quantized copies: the unedited weights' first, then the zeroed ones'; `none` records first
    order = sorted(edits, key=lambda e: (e.name != "none", bool(e.coords), EDITS.index(e.name)))
    ev = RowEvaluator(
        model, ids, ppl_settings, bos_token_id=bos_token_id, progress=False, model_name=(meta or {}).get("model")
    )
    held: tuple | None = None  # the weight edit the held quantized copies were made under
    bar = tqdm(total=len(order), desc="trace: edits", unit="edit", disable=not progress)
    try:
        for e in order:
            if not e.applicable:
                passes[e.name] = Pass(e)
                bar.update()
                continue
            bar.set_postfix_str(e.name)
            begin = time.perf_counter()
            with e.weights(model):
                if held != e.coords:
                    ev.release()  # copies of other weights go before new ones are made
                    held = e.coords
                assert ev.reference_states is not None
                ev.reference_states.clear()  # the float model as edited is the reference: run it again
                p = _run_edit(model, ids, e, ev, det, n, down_blocks, store, coords, settings, progress)
            p.seconds = time.perf_counter() - begin
            passes[e.name] = p
            bar.update()
    finally:
        bar.close()
        ev.release()
    counted = counted_heads(passes["none"].rec, local)
    fields = [*FIELDS, *(row_field(r) for r in settings.rows)]
    edit_dicts = _edit_dicts(passes, settings, counted, span, n, fields)
    chain = _chain(sw, det, passes["none"], windows, settings, local, resamples(n), tokenizer)
    chain["note"] = _chain_note(chain, edit_dicts)
    total = time.perf_counter() - started
    forwards = n * (1 + sum(1 + len(settings.rows) for p in passes.values() if p.edit.applicable))
    cost = {
        "seconds": total,
        "super_weight_detection_seconds": sw_seconds,
        "massive_detection_seconds": det.seconds,
        "edit_seconds": {k: p.seconds for k, p in passes.items()},
        "window_forwards": forwards,
        "tokens_per_forward": settings.window,
        "torch_threads": torch.get_num_threads(),
        "note": few_windows_note(n),
    }
    bos = "corpus" if bos_token_id is None else "window"
    return TraceResult(chain, edit_dicts, settings, n, bos, cost, dict(meta or {}))


def _run_edit(
    model: nn.Module,
    ids: torch.Tensor,
    e: Edit,
    ev: RowEvaluator,
    det: Detection,
    n: int,
    down_blocks: list[int],
    store: dict,
    coords: list,
    settings: TraceSettings,
    progress: bool,
) -> Pass:
    """One pass: the float model as edited, measured by hooks, scored with each quantized row against it.

    Each row's quantized copy is made while the float model carries no hook (a copy would inherit them); the
    float model runs with the first row only, its final states kept for the others (``RowEvaluator``).
    """
    rec = Recorder(model, det, n, down_blocks)
    p = Pass(e, rec)
    rows: list[Row | None] = [Row(m) for m in settings.rows] or [None]
    for i, row in enumerate(rows):
        q = ev.prepare(row).model if row is not None else None
        with ExitStack() as stack:
            if q is not None:
                stack.enter_context(e.hooks(q, store, settings.restore_fraction))
            if i == 0:
                stack.enter_context(eager_attention(model))
                counts = stack.enter_context(e.hooks(model, store, settings.restore_fraction))
                if e.name == "none" and coords and "restore_super_activation" in settings.edits:
                    stack.enter_context(recording(model, coords, store))
                stack.enter_context(rec.hooks())
            if row is None:  # no quantized row: the float model alone
                res = perplexity(
                    model, ids, ev.settings, bos_token_id=ev.bos_token_id, progress=progress, model_name=ev.model_name
                )
                p.nll = np.asarray(res.window_nll)
                p.tokens = np.asarray(res.window_tokens, dtype=np.float64)
            else:
                ev.progress = progress
                r = ev.evaluate(row)
                res = r.result
                if i == 0:
                    p.nll = np.asarray(res.window_ref_nll)
                    p.tokens = np.asarray(res.window_tokens, dtype=np.float64)
                p.kl[row.method] = np.asarray(res.window_kl)
                p.token_kl[row.method] = np.asarray(res.token_kl).reshape(n, -1)
                p.float_columns_pct[row.method] = r.float_columns_pct
            if i == 0:
                p.clamped_tokens = counts["tokens"]
                if rec.next != n:
                    raise RuntimeError(f"the float model ran {rec.next} windows, not the trace's {n}")
    return p


MIN_EFFECT_PCT = ControlSettings().min_effect  # the Δppl (%) `outliers superweights` asks of a super weight


def _chain_note(chain: dict[str, Any], edits: list[dict[str, Any]]) -> str:
    """The chain in words: what feeds what, and what the edits show."""
    parts = []
    sws, massive = chain["super_weights"], chain["massive"]
    if sws:
        sw = sws[0]
        where = f"W[{sw['row']}, {sw['col']}] in block {sw['block']}'s down projection"
        zero = next((e for e in edits if e["edit"] == "zero_super_weights" and e.get("applicable")), None)
        effect = zero.get("delta_ppl_pct") if zero else None
        if effect is None:
            parts.append(f"super-weight candidate {where} (spike rule)")
        elif effect >= MIN_EFFECT_PCT:
            parts.append(f"super weight {where} (zeroed: perplexity {effect:+.0f} %)")
        else:  # Yu et al. define a super weight by its effect: the spike alone does not make one
            parts.append(
                f"spike-rule candidate {where}, a spike rather than a super weight by its effect (zeroed: perplexity "
                f"{effect:+.1f} %, under {MIN_EFFECT_PCT:.0f} %; `outliers superweights` tests it against controls)"
            )
    else:
        parts.append("no super weight by the spike rule")
    if massive:
        m = massive[0]
        toks = ", ".join(repr(t["token"]) if t["token"] else str(t["token_id"]) for t in chain["massive_tokens"][:3])
        feeds = "fed by it" if m["super_weights"] else "not fed by a super weight"
        parts.append(
            f"massive activation in dim {m['dim']} born at block {m['birth_block']} (peak {m['peak']:.4g} at block "
            f"{m['peak_block']}), {feeds}, on {100 * chain['massive_token_share']:.2f} % of the tokens ({toks})"
        )
    else:
        parts.append("no token-specific massive activation")
    from outliers.quant.prefix import compact_blocks

    by_dim: dict[int, list[dict[str, Any]]] = {}
    for w in chain["widespread"]:
        by_dim.setdefault(w["dim"], []).append(w)
    for d, ws in list(by_dim.items())[:2]:
        parts.append(
            f"dim {d} is large on up to {100 * max(w['share'] for w in ws):.0f} % of the tokens in blocks "
            f"{compact_blocks([w['block'] for w in ws])} (a massive dimension, not a token's activation)"
        )
    parts.append(f"{chain['n_sink_heads']} of {chain['n_counted_heads']} heads attend mostly to those tokens")
    return "; ".join(parts)


def trace_html(r: TraceResult) -> str:
    """``TraceResult``: the chain in words, the edits' table."""
    c = r.chain
    rows: list[tuple[Any, ...]] = [("chain", c["note"])]
    for row, share in c["kl_share"].items():
        if share.get("kl_share") is not None:
            rows.append(
                (
                    f"{row} KL on massive tokens",
                    f"{100 * share['kl_share']:.1f} % {fmt_interval(share['kl_share_ci95'], '.3f', 100)}",
                    f"of the KL on {100 * share['token_share']:.2f} % of the tokens",
                )
            )
    settings = [
        ("model", r.meta.get("model")),
        ("corpus", r.meta.get("corpus")),
        ("window", r.settings.window),
        ("windows", r.n_windows),
        ("seconds", f"{r.cost['seconds']:.0f}"),
        *provenance(r.meta),
    ]
    tables = [("edits: value (change against none [95 % paired interval])", r.table())]
    return render_html(named("Outlier lifecycle", r.meta.get("model", "")), rows, settings, tables=tables)
