"""Streaming per-(capture point, feature dim) statistics of hidden-state magnitudes.

Memory does not grow with the tokens scanned: every accumulator has one entry
per (point, dim), plus a fixed top-k list and fixed histograms. Positions masked
out by the attention mask are never counted; NaN/inf values are counted per
point and left out of every other statistic.

Per point and dim, with ``t`` the magnitude threshold:
``absmax``; ``count`` of positions with ``|x| >= t`` (one value per position
and dim, so this is also the number of positions); ``pos``/``neg`` of those
with ``x >= t`` / ``x <= -t`` (one-sidedness); ``sum_out`` of the values with
``|x| >= t`` (their mean, signed); ``sum``/``sumsq`` (mean, std);
``rel_count`` of positions with ``|x| >= k * rms(token)`` (the scale-relative
criterion); and, for residual points, ``massive`` counts (Sun et al. 2024:
``|x| > 100`` and ``> 1000 x`` the token's median magnitude). Per feature
space, ``union`` counts the positions where a dim reaches ``t`` at *any* point
of that space in the same forward pass (Dettmers et al. 2022, §4.1: "across all
hidden states"), ``rel_union`` the same for ``k * rms``, and ``hist`` the |x| histogram.

With ``moments`` (the default), each point also keeps the sums behind the
kurtosis and ∞-norm of Bondarenko et al. 2023 (``PointStat``; tables in
``outliers.analysis.moments``): per token, the fourth standardized moment
across dims, and per sequence, the kurtosis and largest |x| of all its values.
Rows are centred on their own mean in float64 and combined into sequences
exactly (the shift formulas for central moments), so no x⁴ of a raw value is summed.

Names are enums, so a misspelt one fails in the type checker, not as a KeyError mid-analysis:
``stats.get(point, Stat.ABSMAX)``, ``.get_point(point, PointStat.TOKEN_KURT)``, ``.get_space(space, SpaceStat.UNION)``,
``.get_top(Top.ABS)``. ``tensors`` is the saved layout: ``"<point>/<stat>"``, ``"<space>/<stat>"``, ``"top_<field>"``;
without moments it is exactly ``FORMAT_V1``'s, and files in that format load (with ``moments`` off).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from outliers.analysis.fields import (
    FORMAT,
    FORMAT_V1,
    HIST_BINS,
    HIST_EDGES,
    HIST_WIDTH,
    BatchStats,
    PointStat,
    SpaceStat,
    Stat,
    Top,
)
from outliers.analysis.points import CapturePoint
from outliers.analysis.torch_stats import moment_sums, point_stats_torch
from outliers.display import named, provenance, render_html
from outliers.errors import InvalidArgumentError, ModelFileError

__all__ = ["OutlierStats", "Stat", "PointStat", "SpaceStat", "Top", "BatchStats", "HIST_EDGES", "HIST_WIDTH"]


@dataclass
class OutlierStats:
    """Accumulators for a set of capture points; filled by ``outliers.capture``."""

    points: list[CapturePoint]
    threshold: float = 6.0
    relative_k: float = 6.0
    top_k: int = 32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the saved layout: read it with get*
    tokens: dict[str, int] = field(default_factory=dict)  # per point, and per "space:<s>"
    nonfinite: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    moments: bool = True  # keep PointStat (kurtosis, ∞-norm); off: the v1 layout, a little faster

    def _repr_html_(self) -> str:  # a compact table in Jupyter
        return outlier_stats_html(self)

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise InvalidArgumentError(f"threshold must be > 0, got {self.threshold!r}")
        if not self.relative_k > 0:
            raise InvalidArgumentError(f"relative_k must be > 0, got {self.relative_k!r}")
        if not self.points:
            raise InvalidArgumentError("no capture points: nothing would be measured")
        for p in self.points:
            self.tokens.setdefault(p.name, 0)
            self.nonfinite.setdefault(p.name, 0)
        for key, shape, dt in self._layout():
            self.tensors.setdefault(key, torch.zeros(shape, dtype=dt))
        for space in self.spaces:
            self.tokens.setdefault(f"space:{space}", 0)

    def _layout(self) -> list[tuple[str, int, torch.dtype]]:
        """(key, length, dtype) of every tensor: per point, per space, then the top-k list (empty at first)."""
        out = []
        for p in self.points:
            out += [(f"{p.name}/{s}", p.dims, s.dtype) for s in Stat if s is not Stat.MASSIVE or p.kind == "residual"]
            out += [(f"{p.name}/{s}", 1, torch.float64) for s in PointStat] if self.moments else []
        out += [
            (f"{sp}/{s}", HIST_BINS if s is SpaceStat.HIST else dims, torch.int64)
            for sp, dims in self.spaces.items()
            for s in SpaceStat
        ]
        return out + [(t.value, 0, torch.float32 if t in (Top.ABS, Top.VALUE) else torch.int64) for t in Top]

    # ------------------------------------------------------------ shape facts

    @property
    def spaces(self) -> dict[str, int]:
        """Feature space -> number of dims."""
        out: dict[str, int] = {}
        for p in self.points:
            if out.setdefault(p.space, p.dims) != p.dims:
                raise InvalidArgumentError(f"points of space {p.space!r} disagree on dims ({out[p.space]} vs {p.dims})")
        return out

    def get(self, point: str, stat: Stat) -> torch.Tensor:
        """``point``'s per-dim ``stat``, e.g. ``stats.get("L03.attn_in", Stat.ABSMAX)``."""
        return self.tensors[f"{point}/{Stat(stat)}"]

    def get_point(self, point: str, stat: PointStat) -> float:
        """``point``'s ``stat``, a sum over tokens or sequences: ``stats.get_point("L03.residual", PointStat.SEQS)``.

        Raises:
            InvalidArgumentError: statistics taken without moments.
        """
        if not self.moments:
            raise InvalidArgumentError("these statistics were taken without moments (kurtosis, ∞-norm)")
        return float(self.tensors[f"{point}/{PointStat(stat)}"][0])

    def get_space(self, space: str, stat: SpaceStat) -> torch.Tensor:
        """The feature space's ``stat``, e.g. ``stats.get_space("hidden", SpaceStat.UNION)``."""
        return self.tensors[f"{space}/{SpaceStat(stat)}"]

    def get_top(self, field: Top) -> torch.Tensor:
        """One field of the top-k list, largest |x| first, e.g. ``stats.get_top(Top.ABS)``."""
        return self.tensors[Top(field)]

    @property
    def format(self) -> str:
        """The saved format: ``FORMAT`` with moments, else ``FORMAT_V1`` (the layout the code before moments wrote)."""
        return FORMAT if self.moments else FORMAT_V1

    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant in the number of tokens scanned)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> OutlierStats:
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def _at(self, key: str, device: torch.device) -> torch.Tensor:
        """The accumulator ``key``, moved to ``device`` first if it is elsewhere.

        Accumulators live where their activations are: with blocks on several
        devices (``outliers.models.dispatch``) each point's move once, to its
        block's device; ``capture`` brings them all to the CPU at its end.
        """
        t = self.tensors[key]
        if t.device != device:
            t = self.tensors[key] = t.to(device)
        return t

    # ------------------------------------------------------------ updates

    def update(
        self,
        point: CapturePoint,
        x: torch.Tensor,
        union: dict[str, torch.Tensor] | None = None,
        seq_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        token_ids: torch.Tensor | None = None,
        point_index: int = 0,
    ) -> None:
        """Add the rows of ``x (tokens, dims)`` (already padding-masked) to ``point``'s statistics.

        ``union`` maps a space to a uint8 ``(tokens, dims)`` buffer for the
        current forward pass; this point's ``|x| >= t`` (and ``>= k*rms``, under
        ``space + ":rel"``) are OR-ed into it, so ``flush_union`` can count
        positions over all points of a space. ``seq_ids``/``positions``/``token_ids``
        (one per row) label the top-k values: each token offers its largest |x|.
        """
        x = x.float()
        rows, dims = x.shape
        union = {} if union is None else union
        for key in (point.space, point.space + ":rel"):
            if key not in union or union[key].shape != (rows, dims):
                union[key] = torch.zeros((rows, dims), dtype=torch.uint8, device=x.device)
            elif union[key].device != x.device:  # this pass's earlier points ran on another device
                union[key] = union[key].to(x.device)
        T, key, at = self.tensors, point.name + "/", lambda k: self._at(k, x.device)
        hist = at(f"{point.space}/{SpaceStat.HIST}")
        if x.device.type == "cpu":  # one kernel call adds into the accumulators: no torch op per statistic
            from outliers.analysis.cpu_kernels import accumulate_point

            acc = {s.value: at(key + s) for s in Stat if s is not Stat.MASSIVE}
            nonfinite, row_max, row_arg, row_moments = accumulate_point(
                x.contiguous(),
                self.threshold,
                self.relative_k,
                1 / HIST_WIDTH,
                acc,
                hist,
                union[point.space],
                union[point.space + ":rel"],
                self.moments,
            )
        else:
            r = point_stats_torch(
                x, self.threshold, self.relative_k, union[point.space], union[point.space + ":rel"], self.moments
            )
            T[key + Stat.ABSMAX] = torch.maximum(at(key + Stat.ABSMAX), r.absmax)
            for stat, v in (
                (Stat.COUNT, r.count),
                (Stat.SUM_OUT, r.sum_out),
                (Stat.SUM, r.sum),
                (Stat.SUMSQ, r.sumsq),
                (Stat.REL_COUNT, r.rel_count),
                (Stat.POS, r.pos),
                (Stat.NEG, r.count - r.pos),
            ):
                at(key + stat).add_(v)
            hist.add_(r.hist)
            nonfinite, row_max, row_arg, row_moments = int(r.nonfinite), r.row_max, r.row_arg, r.row_moments
        self.nonfinite[point.name] += nonfinite
        self.tokens[point.name] += rows
        if point.kind == "residual" and bool((row_max > 100).any()):
            # Sun et al.: > 100 and > 1000x the median magnitude of the hidden state
            # (this forward's whole tensor at this point). The median comes from an
            # evenly strided sample of ~8k values: a full sort per point would cost
            # more than the forward pass itself.
            flat = x.reshape(-1)
            med = flat[:: max(1, flat.numel() // 8192)].abs().nan_to_num(0.0, 0.0, 0.0).median()
            massive = at(key + Stat.MASSIVE)
            if x.device.type == "cpu" and x.is_contiguous() and massive.dtype == torch.int64:
                from outliers.analysis.cpu_kernels import massive_counts

                massive_counts(x, row_max, 100.0, 1000 * med, massive)
            else:
                cand = torch.nonzero(row_max > 100).view(-1)  # only these rows can hold one
                a = x[cand].abs().nan_to_num(0.0, 0.0, 0.0)
                massive.add_(((a > 100) & (a > 1000 * med)).sum(0))
        if self.top_k and seq_ids is not None and rows:
            self._update_top(row_max, row_arg, x, point_index, seq_ids, positions, token_ids)
        if row_moments is not None and rows:
            self._update_moments(key, row_moments, row_max, seq_ids)

    def _update_moments(self, key: str, m: torch.Tensor, row_max: torch.Tensor, seq_ids: torch.Tensor | None) -> None:
        if m.device.type == "cpu":
            from outliers.analysis.cpu_kernels import moment_sums_cpu

            sums = moment_sums_cpu(m, row_max, seq_ids)
        else:
            sums = moment_sums(m, row_max, seq_ids)
        for stat, v in sums.items():
            acc = self._at(key + stat, v.device)
            if stat is PointStat.TOKEN_KURT_MAX:
                self.tensors[key + stat] = torch.maximum(acc, v)
            else:
                acc.add_(v)

    def flush_union(self, union: dict[str, torch.Tensor]) -> None:
        """Count one forward pass's OR-ed ``|x| >= t`` positions per space."""
        for space in self.spaces:
            if space in union:
                self._at(f"{space}/{SpaceStat.UNION}", union[space].device).add_(union[space].sum(0, dtype=torch.int64))
                rel = union[space + ":rel"]
                self._at(f"{space}/{SpaceStat.REL_UNION}", rel.device).add_(rel.sum(0, dtype=torch.int64))
                self.tokens[f"space:{space}"] += union[space].shape[0]

    def _update_top(self, row_max, row_arg, x, point_index, seq_ids, positions, token_ids) -> None:
        held = self.tensors[Top.ABS]
        if len(held) >= self.top_k and len(row_max) and bool(row_max.max().to(held.device) < held.min()):
            return  # nothing here beats the k-th largest held (a tie still goes through topk, as before)
        k = min(self.top_k, len(row_max))
        vals, rows = row_max.topk(k)
        dims = row_arg[rows]
        T = self.tensors
        cand = {
            Top.ABS: vals.float(),
            Top.VALUE: x[rows, dims].float(),
            Top.POINT: torch.full_like(rows, point_index),
            Top.SEQ: seq_ids[rows].to(rows.device),
            Top.POS: positions[rows].to(rows.device),
            Top.TOKEN: token_ids[rows].to(rows.device),
            Top.DIM: dims,
        }
        merged = {f: torch.cat([T[f].to(v.device), v]) for f, v in cand.items()}
        keep = merged[Top.ABS].topk(min(self.top_k, len(merged[Top.ABS]))).indices
        for f, v in merged.items():
            T[f.value] = v[keep]

    # ------------------------------------------------------------ combine, save, load

    def merge(self, other: OutlierStats) -> OutlierStats:
        """Return the statistics of both scans together (same points and thresholds)."""
        if [p.name for p in self.points] != [p.name for p in other.points] or (
            self.threshold,
            self.relative_k,
            self.moments,
        ) != (other.threshold, other.relative_k, other.moments):
            raise InvalidArgumentError("can only merge scans of the same capture points, thresholds and moments")
        out = OutlierStats(
            self.points, self.threshold, self.relative_k, self.top_k, meta=dict(self.meta), moments=self.moments
        )
        absmax = {f"{p.name}/{s}" for p in self.points for s in (Stat.ABSMAX, PointStat.TOKEN_KURT_MAX)}
        for key, _, _ in self._layout()[: -len(Top)]:  # per point and per space: the maximum or the sum
            v, w = self.tensors[key], other.tensors[key].to(self.tensors[key].device)
            out.tensors[key] = torch.maximum(v, w) if key in absmax else v + w
        mine, theirs = self.tensors, other.tensors
        top = {f: torch.cat([mine[f], theirs[f].to(mine[f].device)]) for f in Top}
        other_offset = int(mine[Top.SEQ].max().item()) + 1 if len(mine[Top.SEQ]) else 0
        top[Top.SEQ][len(mine[Top.SEQ]) :] += other_offset  # sequences of the second scan come after
        keep = top[Top.ABS].topk(min(self.top_k, len(top[Top.ABS]))).indices
        out.tensors.update({f.value: v[keep] for f, v in top.items()})
        out.tokens = {k: self.tokens[k] + other.tokens[k] for k in self.tokens}
        out.nonfinite = {k: self.nonfinite[k] + other.nonfinite[k] for k in self.nonfinite}
        return out

    def save(self, folder: str | Path) -> Path:
        """Write ``stats.safetensors`` (tensors) and ``stats.json`` (everything else) into ``folder``."""
        from safetensors.torch import save_file

        from outliers.cache import atomic_path, atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "stats.safetensors") as tmp:
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                str(tmp),
                metadata={"format": self.format},
            )
        info = {
            "format": self.format,
            "threshold": self.threshold,
            "relative_k": self.relative_k,
            "top_k": self.top_k,
            "points": [asdict(p) for p in self.points],
            "tokens": self.tokens,
            "nonfinite": self.nonfinite,
            "meta": self.meta,
        }
        atomic_write(folder / "stats.json", json.dumps(info, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> OutlierStats:
        """Read what ``save`` wrote. Raises ModelFileError for a missing or foreign folder."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            info = json.loads((folder / "stats.json").read_text())
            tensors = load_file(str(folder / "stats.safetensors"))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"no readable outlier statistics in {folder}: {e}") from e
        if info.get("format") not in (FORMAT, FORMAT_V1):
            raise ModelFileError(f"{folder}/stats.json is {info.get('format')!r}, not '{FORMAT}' or '{FORMAT_V1}'")
        points = [CapturePoint(**p) for p in info["points"]]
        st = cls(
            points,
            info["threshold"],
            info["relative_k"],
            info["top_k"],
            {},
            info["tokens"],
            info["nonfinite"],
            info["meta"],
            moments=info["format"] == FORMAT,
        )
        layout = [k for k, _, _ in st._layout()]
        lacks, unknown = sorted(set(layout) - set(tensors)), sorted(set(tensors) - set(layout))
        if lacks or unknown:
            raise ModelFileError(
                f"{folder}/stats.safetensors does not match the points in stats.json: "
                f"it lacks {lacks} and holds unknown {unknown}"
            )
        st.tensors = {k: tensors[k] for k in layout}
        return st


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
    return render_html(named("Outlier statistics", model), rows, settings, tables=tables)
