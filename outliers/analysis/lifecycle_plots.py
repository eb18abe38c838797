"""The outlier lifecycle as a diagram (``outliers.analysis.lifecycle``): a matplotlib Figure, no pyplot state.

Blocks run along x; each link of the chain has a lane: the super weight, the massive activation (a bar over the
blocks where it is flagged), the sink heads (marker size: sink heads per layer), the key channels (marker size:
each layer's concentration; filled where the top channel peaks on the massive tokens) and the quantized rows'
KL at the output. Each node is annotated with its measured size; each arrow with the change in the next link
when its source is edited (with the clamp's control beside it), and the paired 95 % interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from outliers.analysis.lifecycle import TraceResult

__all__ = ["chain_figure"]

LANES = {"weight": 4, "massive": 3, "sinks": 2, "keys": 1, "kl": 0}
LANE_LABELS = {
    "weight": "super weight",
    "massive": "massive activation",
    "sinks": "sink heads",
    "keys": "key channels",
    "kl": "quantization KL",
}


def _edit(edits: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for e in edits:
        if e["edit"] == name and e.get("applicable"):
            return e
    return None


def _change(e: dict[str, Any] | None, field: str, fmt: str = ".3g") -> str | None:
    if e is None or e.get(f"{field}_delta") is None:
        return None
    ci = e.get(f"{field}_delta_ci95")
    interval = f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""
    return f"{e[f'{field}_delta']:+{fmt}}{interval}"


def _label(parts: list[tuple[str, str | None]]) -> str:
    return "\n".join(f"{name}: {text}" for name, text in parts if text is not None)


PROFILES = (("none", "tab:orange", "-"), ("zero_super_weights", "tab:red", "--"), ("clamp_massive", "0.4", ":"))


def _profiles(ax: Any, edits: list[dict[str, Any]], y: float) -> None:
    """The massive dim's largest |h| per block (log scale, squeezed into the lane) for none, zeroed and clamped."""
    lines = [
        (e, color, style) for name, color, style in PROFILES if (e := _edit(edits, name)) and e.get("massive_by_block")
    ]
    if not lines:
        return
    logs = [np.log10(np.clip(np.asarray(e["massive_by_block"], dtype=float), 1e-3, None)) for e, _, _ in lines]
    lo, hi = min(v.min() for v in logs), max(v.max() for v in logs)
    span = hi - lo if hi > lo else 1.0
    names = {"none": "none", "zero_super_weights": "zeroed (dashed)", "clamp_massive": "clamped (dotted)"}
    shown = ", ".join(names[e["edit"]] for e, _, _ in lines)
    for (e, color, style), v in zip(lines, logs, strict=True):
        ax.plot(
            np.arange(len(v)), y - 0.35 + 0.7 * (v - lo) / span, color=color, ls=style, lw=1, alpha=0.8, label=e["edit"]
        )
    ax.text(
        0.995,
        0.995,
        f"massive activation, |h| on its tokens per block (log scale {10**lo:.2g} to {10**hi:.2g}): {shown}",
        transform=ax.transAxes,
        fontsize=7,
        color="0.35",
        ha="right",
        va="top",
    )


def chain_figure(result: TraceResult | dict[str, Any]) -> Figure:
    """The chain diagram of a ``TraceResult`` (or its ``to_dict()``, as a study stores it)."""
    d = result.to_dict() if hasattr(result, "to_dict") else result
    c, edits = d["chain"], d["edits"]
    n_blocks = len(c["flagged_share_per_block"])
    rows = [k for k in c["kl_share"]] or list(d.get("settings", {}).get("rows", ()))
    fig = Figure(figsize=(max(9.0, 0.28 * n_blocks + 6), 6.2))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    out_x = n_blocks + 0.5
    ax.set_xlim(-1, n_blocks + 2.5)
    ax.set_ylim(-0.7, 4.7)
    ax.set_yticks(list(LANES.values()), [LANE_LABELS[k] for k in LANES])
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.2)
    for y in LANES.values():
        ax.axhline(y, color="0.9", lw=0.8, zorder=0)
    box = {"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.7", "alpha": 0.9}

    # the super weight
    sw = c["super_weights"]
    sw_xy = None
    if sw:
        w = sw[0]
        sw_xy = (w["block"], LANES["weight"])
        ax.scatter(*sw_xy, s=160, color="tab:red", zorder=3)
        more = f" (+{len(sw) - 1})" if len(sw) > 1 else ""
        ax.annotate(
            f"W[{w['row']}, {w['col']}] = {w['value']:.3g}{more}\noutput {w['activation']:.3g}",
            sw_xy,
            xytext=(8, 6),
            textcoords="offset points",
            fontsize=8,
            bbox=box,
        )
    else:
        ax.text(0, LANES["weight"], "no super weight by the spike rule", fontsize=9, va="center", color="0.4")

    # the massive activation
    m_xy = None
    if c["massive"]:
        m = c["massive"][0]
        m_xy = (m["birth_block"], LANES["massive"])
        ax.plot([m["birth_block"], m["last_block"]], [LANES["massive"]] * 2, lw=6, color="tab:orange", alpha=0.35)
        ax.scatter(*m_xy, s=160, color="tab:orange", zorder=3)
        none = _edit(edits, "none")
        size = none.get("massive_activation") if none else None
        ax.annotate(
            f"dim {m['dim']}, |h| {size if size is None else format(size, '.3g')}\n"
            f"on {100 * c['massive_token_share']:.2g} % of tokens",
            m_xy,
            xytext=(8, 6),
            textcoords="offset points",
            fontsize=8,
            bbox=box,
        )
    _profiles(ax, edits, LANES["massive"])
    for w in c["widespread"]:
        ax.scatter(w["block"], LANES["massive"], s=30, marker="s", color="0.6", zorder=2)
    if c["widespread"]:
        ax.annotate(
            f"dim {c['widespread'][0]['dim']} large on most tokens",
            (c["widespread"][0]["block"], LANES["massive"]),
            xytext=(0, -16),
            textcoords="offset points",
            fontsize=7,
            color="0.4",
        )

    # sink heads per layer
    per_layer: dict[int, int] = {}
    for h in c["sink_heads"]:
        per_layer[int(h["layer"])] = per_layer.get(int(h["layer"]), 0) + 1
    s_xy = None
    if per_layer:
        xs = sorted(per_layer)
        ax.scatter(xs, [LANES["sinks"]] * len(xs), s=[20 + 25 * per_layer[x] for x in xs], color="tab:blue", alpha=0.6)
        births = [m["birth_block"] for m in c["massive"]]
        after = [x for x in xs if births and x > min(births)]
        s_xy = ((after or xs)[0], LANES["sinks"])  # the first sink layer the massive activation can reach
    none = _edit(edits, "none") or {}
    rate, first = none.get("sink_rate"), none.get("first_token_attention")
    known = rate is not None and first is not None
    rates = f"\nsink rate {rate:.3g}, first-token attention {first:.3g}" if known else ""
    ax.annotate(
        f"{c['n_sink_heads']} of {c['n_counted_heads']} heads on the massive tokens" + rates,
        (s_xy or (0, LANES["sinks"])),
        xytext=(8, -22),
        textcoords="offset points",
        fontsize=8,
        bbox=box,
    )

    # key channels per layer
    k_xy = None
    if c["key_layers"]:
        layers = c["key_layers"]
        xs = [k["layer"] for k in layers]
        conc = np.array([k["concentration"] for k in layers], dtype=float)
        sizes = 15 + 40 * np.log10(np.clip(np.nan_to_num(conc, nan=1.0), 1, None))
        filled = [k["top_on_massive_tokens"] for k in layers]
        ax.scatter(
            xs,
            [LANES["keys"]] * len(xs),
            s=sizes,
            facecolors=["tab:green" if f else "none" for f in filled],
            edgecolors="tab:green",
        )
        k_xy = (xs[int(np.nanargmax(conc))] if np.isfinite(conc).any() else xs[0], LANES["keys"])
        ax.annotate(
            f"median concentration {c['key_concentration']:.3g}\n"
            f"({c['key_concentration_other_tokens']:.3g} without the massive tokens)",
            (xs[0], LANES["keys"]),
            xytext=(8, -26),
            textcoords="offset points",
            fontsize=8,
            bbox=box,
        )

    # the quantized rows' KL at the output
    kl_xy = (out_x, LANES["kl"])
    texts = []
    for row in rows:
        share = c["kl_share"].get(row, {})
        kl = none.get("kl_vs_ref_" + "".join(ch if ch.isalnum() else "_" for ch in row))
        if kl is None:
            continue
        on = share.get("kl_share")
        where = f"\n{100 * on:.2g} % of it on the massive tokens" if on is not None else ""
        texts.append(f"{row} KL {kl:.3g}{where}")
    if texts:
        ax.scatter(*kl_xy, s=160, color="tab:purple", zorder=3)
        label = "\n".join(texts)
        ax.annotate(label, kl_xy, xytext=(-10, 12), textcoords="offset points", fontsize=8, ha="right", bbox=box)

    # edges: the change in the target when the source is edited
    zero, restore = _edit(edits, "zero_super_weights"), _edit(edits, "restore_super_activation")
    clamp, control = _edit(edits, "clamp_massive"), _edit(edits, "clamp_control")
    arrow = {"arrowstyle": "->", "color": "0.3", "lw": 1.2, "shrinkA": 8, "shrinkB": 8}

    tag = {"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.85}

    def edge(src: tuple[float, float] | None, dst: tuple[float, float] | None, text: str, at: float = 0.5) -> None:
        if src is None or dst is None or not text:
            return
        ax.annotate("", dst, xytext=src, arrowprops=arrow)
        mid = (src[0] + at * (dst[0] - src[0]), src[1] + at * (dst[1] - src[1]))
        ax.annotate(
            text, mid, xytext=(6, 0), textcoords="offset points", fontsize=7, color="0.15", va="center", bbox=tag
        )

    edge(
        sw_xy,
        m_xy,
        _label(
            [
                ("zero: |h| at birth", _change(zero, "massive_at_birth")),
                ("restore", _change(restore, "massive_at_birth")),
            ]
        ),
    )
    edge(
        m_xy,
        s_xy,
        _label([("clamp: sink rate", _change(clamp, "sink_rate")), ("control", _change(control, "sink_rate"))]),
        at=0.45,
    )
    edge(
        m_xy,
        k_xy,
        _label(
            [
                ("clamp: key conc", _change(clamp, "key_concentration")),
                ("control", _change(control, "key_concentration")),
            ]
        ),
        at=0.85,
    )
    if rows:
        field = "kl_vs_ref_" + "".join(ch if ch.isalnum() else "_" for ch in rows[0])
        edge(
            m_xy,
            kl_xy if texts else None,
            _label([(f"clamp: {rows[0]} KL", _change(clamp, field)), ("control", _change(control, field))]),
            at=0.75,
        )
    ax.set_title(f"Outlier lifecycle: {d.get('model', '')}".rstrip(": "), fontsize=11)
    return fig
