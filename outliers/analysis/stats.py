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
of that space in the same forward pass (the paper's "across all hidden states").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from outliers.errors import InvalidArgumentError, ModelFileError
from outliers.analysis.points import CapturePoint

__all__ = ["OutlierStats", "FIELDS", "HIST_EDGES", "HIST_WIDTH"]

FIELDS = {"absmax": torch.float32, "count": torch.int64, "pos": torch.int64, "neg": torch.int64,
          "sum_out": torch.float64, "sum": torch.float64, "sumsq": torch.float64,
          "rel_count": torch.int64, "rel_union": torch.int64, "massive": torch.int64}
# |x| histogram per space: bins of 0.5 from 0 to 128; the last bin also takes larger values
HIST_WIDTH, HIST_BINS = 0.5, 256
HIST_EDGES = torch.arange(HIST_BINS + 1) * HIST_WIDTH
FORMAT = "outliers.stats/1"


@dataclass
class OutlierStats:
    """Accumulators for a set of capture points; filled by ``outliers.capture``."""

    points: list[CapturePoint]
    threshold: float = 6.0
    relative_k: float = 6.0
    top_k: int = 32
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # "point/field" and "space/field"
    tokens: dict[str, int] = field(default_factory=dict)  # per point, and per "space:<s>"
    nonfinite: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

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
            for f, dt in FIELDS.items():
                if f.endswith("union") or (f == "massive" and p.kind != "residual"):
                    continue
                self.tensors.setdefault(f"{p.name}/{f}", torch.zeros(p.dims, dtype=dt))
        for space, dims in self.spaces.items():
            self.tokens.setdefault(f"space:{space}", 0)
            self.tensors.setdefault(f"{space}/union", torch.zeros(dims, dtype=torch.int64))
            self.tensors.setdefault(f"{space}/rel_union", torch.zeros(dims, dtype=torch.int64))
            self.tensors.setdefault(f"{space}/hist", torch.zeros(HIST_BINS, dtype=torch.int64))
        for f, dt in (("top_abs", torch.float32), ("top_value", torch.float32), ("top_point", torch.int64),
                      ("top_seq", torch.int64), ("top_pos", torch.int64), ("top_token", torch.int64),
                      ("top_dim", torch.int64)):
            self.tensors.setdefault(f, torch.empty(0, dtype=dt))

    # ------------------------------------------------------------ shape facts

    @property
    def spaces(self) -> dict[str, int]:
        """Feature space -> number of dims."""
        out: dict[str, int] = {}
        for p in self.points:
            if out.setdefault(p.space, p.dims) != p.dims:
                raise InvalidArgumentError(f"points of space {p.space!r} disagree on dims ({out[p.space]} vs {p.dims})")
        return out

    def get(self, point: str, name: str) -> torch.Tensor:
        return self.tensors[f"{point}/{name}"]

    def nbytes(self) -> int:
        """Bytes held by the accumulators (constant in the number of tokens scanned)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str) -> "OutlierStats":
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    # ------------------------------------------------------------ updates

    def update(self, point: CapturePoint, x: torch.Tensor, union: dict[str, torch.Tensor] | None = None,
               seq_ids: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               token_ids: torch.Tensor | None = None, point_index: int = 0) -> None:
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
        if x.device.type == "cpu":
            from outliers.analysis.cpu_kernels import point_stats

            r = point_stats(x.contiguous(), self.threshold, self.relative_k, 1 / HIST_WIDTH, HIST_BINS,
                            union[point.space], union[point.space + ":rel"])
        else:
            r = _point_stats_torch(x, self.threshold, self.relative_k, union[point.space],
                                   union[point.space + ":rel"])
        T = self.tensors
        key = point.name + "/"
        T[key + "absmax"] = torch.maximum(T[key + "absmax"], r["absmax"])
        for f in ("count", "sum_out", "sum", "sumsq", "rel_count"):
            T[key + f] += r[f]
        T[key + "pos"] += r["pos"]
        T[key + "neg"] += r["count"] - r["pos"]
        T[point.space + "/hist"] += r["hist"]
        self.nonfinite[point.name] += int(r["nonfinite"])
        self.tokens[point.name] += rows
        if point.kind == "residual" and bool((r["row_max"] > 100).any()):
            # Sun et al.: > 100 and > 1000x the median magnitude of the hidden state
            # (this forward's whole tensor at this point). The median comes from an
            # evenly strided sample of ~8k values: a full sort per point would cost
            # more than the forward pass itself.
            flat = x.reshape(-1)
            med = flat[:: max(1, flat.numel() // 8192)].abs().nan_to_num(0.0, 0.0, 0.0).median()
            cand = torch.nonzero(r["row_max"] > 100).view(-1)  # only these rows can hold one
            a = x[cand].abs().nan_to_num(0.0, 0.0, 0.0)
            T[key + "massive"] += ((a > 100) & (a > 1000 * med)).sum(0)
        if self.top_k and seq_ids is not None and rows:
            self._update_top(r["row_max"], r["row_arg"], x, point_index, seq_ids, positions, token_ids)

    def flush_union(self, union: dict[str, torch.Tensor]) -> None:
        """Count one forward pass's OR-ed ``|x| >= t`` positions per space."""
        for space in self.spaces:
            if space in union:
                self.tensors[f"{space}/union"] += union[space].sum(0, dtype=torch.int64)
                self.tensors[f"{space}/rel_union"] += union[space + ":rel"].sum(0, dtype=torch.int64)
                self.tokens[f"space:{space}"] += union[space].shape[0]

    def _update_top(self, row_max, row_arg, x, point_index, seq_ids, positions, token_ids) -> None:
        k = min(self.top_k, len(row_max))
        vals, rows = row_max.topk(k)
        dims = row_arg[rows]
        T = self.tensors
        cand = {"top_abs": vals.float(), "top_value": x[rows, dims].float(),
                "top_point": torch.full_like(rows, point_index), "top_seq": seq_ids[rows].to(rows.device),
                "top_pos": positions[rows].to(rows.device), "top_token": token_ids[rows].to(rows.device),
                "top_dim": dims}
        merged = {f: torch.cat([T[f].to(v.device), v]) for f, v in cand.items()}
        keep = merged["top_abs"].topk(min(self.top_k, len(merged["top_abs"]))).indices
        for f, v in merged.items():
            T[f] = v[keep]

    # ------------------------------------------------------------ combine, save, load

    def merge(self, other: "OutlierStats") -> "OutlierStats":
        """Return the statistics of both scans together (same points and thresholds)."""
        if [p.name for p in self.points] != [p.name for p in other.points] or \
                (self.threshold, self.relative_k) != (other.threshold, other.relative_k):
            raise InvalidArgumentError("can only merge scans of the same capture points and thresholds")
        out = OutlierStats(self.points, self.threshold, self.relative_k, self.top_k, meta=dict(self.meta))
        for k, v in self.tensors.items():
            w = other.tensors[k].to(v.device)
            if k.endswith("/absmax"):
                out.tensors[k] = torch.maximum(v, w)
            elif not k.startswith("top_"):
                out.tensors[k] = v + w
        top = {f: torch.cat([self.tensors[f], other.tensors[f].to(self.tensors[f].device)])
               for f in self.tensors if f.startswith("top_")}
        other_offset = int(self.tensors["top_seq"].max().item()) + 1 if len(self.tensors["top_seq"]) else 0
        top["top_seq"][len(self.tensors["top_seq"]):] += other_offset  # sequences of the second scan come after
        keep = top["top_abs"].topk(min(self.top_k, len(top["top_abs"]))).indices
        out.tensors.update({f: v[keep] for f, v in top.items()})
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
            save_file({k: v.detach().cpu().contiguous() for k, v in self.tensors.items()},
                      str(tmp), metadata={"format": FORMAT})
        info = {"format": FORMAT, "threshold": self.threshold, "relative_k": self.relative_k,
                "top_k": self.top_k, "points": [asdict(p) for p in self.points],
                "tokens": self.tokens, "nonfinite": self.nonfinite, "meta": self.meta}
        atomic_write(folder / "stats.json", json.dumps(info, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "OutlierStats":
        """Read what ``save`` wrote. Raises ModelFileError for a missing or foreign folder."""
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            info = json.loads((folder / "stats.json").read_text())
            tensors = load_file(str(folder / "stats.safetensors"))
        except (OSError, ValueError) as e:
            raise ModelFileError(f"no readable outlier statistics in {folder}: {e}") from e
        if info.get("format") != FORMAT:
            raise ModelFileError(f"{folder}/stats.json is not '{FORMAT}'")
        points = [CapturePoint(**p) for p in info["points"]]
        return cls(points, info["threshold"], info["relative_k"], info["top_k"], tensors,
                   info["tokens"], info["nonfinite"], info["meta"])


def _point_stats_torch(x: torch.Tensor, t: float, k_rel: float, union: torch.Tensor,
                       rel_union: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same sums as ``_cpu_kernels.point_stats`` in plain torch (any device)."""
    finite = torch.isfinite(x)
    x0 = torch.where(finite, x, torch.zeros((), device=x.device))
    a = x0.abs()
    ge = (a >= t) & finite
    rms = x0.double().pow(2).sum(1, keepdim=True).div(x.shape[1]).sqrt()  # float64, as the CPU kernel
    rel = (a >= k_rel * rms) & finite
    union |= ge.to(torch.uint8)
    rel_union |= rel.to(torch.uint8)
    bins = (a[finite] / HIST_WIDTH).long().clamp_(max=HIST_BINS - 1)
    row_max, row_arg = a.max(1)
    return {"absmax": a.amax(0), "count": ge.sum(0), "pos": (ge & (x0 > 0)).sum(0),
            "sum_out": torch.where(ge, x0, 0).sum(0, dtype=torch.float64),
            "sum": x0.sum(0, dtype=torch.float64), "sumsq": (x0 * x0).sum(0, dtype=torch.float64),
            "rel_count": rel.sum(0), "hist": torch.bincount(bins, minlength=HIST_BINS),
            "nonfinite": (~finite).sum(), "row_max": row_max, "row_arg": row_arg}
