"""``studies run --dry-run``: the grid, the memory each cell needs, and whether it fits the devices present.

Nothing is loaded: a model's size is ``outliers.models.size.model_size``
(safetensors headers and config.json, a GGUF header before conversion, a hub
id's cached or downloaded config.json). A hub id that is neither cached nor
reachable says "size unknown (offline)" and touches no network beyond the one
reachability probe (``outliers.models.hub``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outliers.errors import OutliersError
from outliers.models.size import OFFLINE, ModelSize, model_size

if TYPE_CHECKING:
    from .config import StudyConfig

__all__ = ["Device", "cell_memory", "devices", "dry_run"]

GIB = 2**30
_CHUNK_LOGITS = 1 << 23  # outliers.arch.lmhead makes a perplexity's logits ~2^23 at a time
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Device:
    name: str  # "cpu", "cuda:0"
    free: int  # bytes
    total: int


def cell_memory(size: ModelSize, cell: dict[str, Any], cfg: StudyConfig) -> int:
    """Return the bytes one cell needs at its peak: an estimate from the model's shapes, not a measurement.

    With P parameters, h hidden, L layers, H heads, V vocabulary, w the study's
    window, b its batch size and d the bytes of its dtype (4 for float32)::

        weights     = P × d                          the float model, held for all of its cells
        codes       = (P − V × h) × 1                a quantized cell's int8 codes (every weight but the
                                                     embedding; 4-bit codes counted at a byte, an upper bound)
        transformed = P × d                          a method with a transform (``@smooth=``, ``@hadamard``)
                                                     holds a transformed float copy besides the float model
        reference   = max_windows × w × h × 4        a perplexity cell keeps the float model's final hidden states
        activations = b × w × 16 h × 4               the block's hidden states, the 4h FFN among them,
                      + b × H × w² × 4               and one layer's attention scores
        logits      = 2 × 2²³ × 4                    perplexity: logits and their log-softmax a chunk of
                                                     positions at a time (``outliers.arch.lmhead``)
                    = b × V × 4                      other cells: the last position's only (``run_for_hooks``)
        sinks       + b × H × w² × 4                 eager attention: one layer's probabilities beside its scores
        scan        + 4 × L × h × 16 × 8             per capture point (4 per block) and dim, float64 accumulators

    and a cell needs weights + activations + logits + what its kind and method add.
    """
    from outliers.quant.transform_spec import parse_row

    d = _DTYPE_BYTES.get(cfg.dtype, 4)
    P, h, L, H, V = size.n_params, size.hidden_size, size.num_layers, size.num_heads, size.vocab_size
    b, w = cfg.batch_size, cfg.window
    need = P * d + b * w * 16 * h * 4 + b * H * w * w * 4
    kind, method = cell["kind"], cell["method"]
    need += 2 * _CHUNK_LOGITS * 4 if kind == "perplexity" else b * V * 4
    if kind == "perplexity":
        need += cfg.max_windows * w * h * 4
        if method != "fp32":
            need += max(P - V * h, 0)
            if parse_row(method)[1]:
                need += P * d
    elif kind == "sinks":
        need += b * H * w * w * 4
    elif kind == "outliers":
        need += 4 * L * h * 16 * 8
    return int(need)


def devices() -> list[Device]:
    """Return the memory free and total on the CPU (psutil) and on each CUDA device (torch.cuda)."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    out = [Device("cpu", int(vm.available), int(vm.total))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(Device(f"cuda:{i}", int(free), int(total)))
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.0f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _size(model: str, online: bool | None) -> tuple[ModelSize | None, str]:
    """``model_size``, with a spec it cannot read shown in the grid rather than raised: a dry run reports."""
    try:
        return model_size(model, online=online)
    except OutliersError as e:
        return None, f"size unknown ({e})"


def _states(cfg: StudyConfig, out: Path | None) -> dict[str, str]:
    """Cell key -> state, from the study folder's store where it has one; empty otherwise."""
    if out is None or not (out / "results.sqlite").exists():
        return {}
    from .planning import plan
    from .store import Store

    store = Store(out)
    try:
        return {p.key: p.state for p in plan(cfg, store)}
    finally:
        store.close()


def dry_run(cfg: StudyConfig, out: str | Path | None = None, *, online: bool | None = None) -> str:
    """Return the dry run's text: per model its size, per cell its state, the memory it needs and where it fits.

    ``out``: the study folder; where it holds results, cells are done / older / stale / failed / pending
    as ``studies status`` says, otherwise all pending. ``online``: as for ``outliers.models.size.model_size``.
    """
    from .planning import cell_key, cells

    out = Path(out) if out is not None else None
    states = _states(cfg, out)
    here = devices()
    grid = cells(cfg)
    lines = [
        f"{cfg.name}: {len(grid)} cells" + (f" (states from {out})" if states else " (nothing stored yet)"),
        "devices: "
        + "; ".join(f"{d.name} {_gib(d.free)} free of {_gib(d.total)}" for d in here)
        + ("" if len(here) > 1 else "; no CUDA device"),
        f"dtype {cfg.dtype}, window {cfg.window}, batch {cfg.batch_size}; memory estimated by "
        "studies.dryrun.cell_memory (weights + codes + activations), not measured",
        "",
    ]
    header = f"  {'measure':<13}{'method':<28}{'threshold':>9}  {'state':<8}{'needs':>10}  fits"
    sizes: dict[str, tuple[ModelSize | None, str]] = {}
    counts: dict[str, int] = {}
    for cell in grid:
        model = cell["model"]
        if model not in sizes:
            size, why = sizes[model] = _size(model, online)
            if online is None and (why == OFFLINE or (size and size.source == "hub config.json")):
                online = size is not None  # the hub was probed: once is enough
            facts = (
                f"{size.model_type}, {_count(size.n_params)} params, hidden {size.hidden_size}, "
                f"{size.num_layers} layers, vocab {size.vocab_size} (from {size.source})"
                if size
                else why
            )
            lines += [f"{model} [{cell['corpus']}]: {facts}", header]
        size = sizes[model][0]
        state = states.get(cell_key(cell), "pending")
        counts[state] = counts.get(state, 0) + 1
        if size is None:
            needs, fits = "?", "?"
        else:
            need = cell_memory(size, cell, cfg)
            needs = _gib(need)
            fits = ", ".join(d.name for d in here if d.free >= need) or "no device has that much free"
        threshold = "" if cell["threshold"] is None else f"{cell['threshold']:g}"
        lines.append(f"  {cell['kind']:<13}{cell['method']:<28}{threshold:>9}  {state:<8}{needs:>10}  {fits}")
    lines += ["", ", ".join(f"{s} {n}" for s, n in counts.items())]
    if unreachable := [m for m, (_, why) in sizes.items() if why == OFFLINE]:
        lines.append(
            f"{len(unreachable)} model(s) neither cached nor reachable ({unreachable[0]} first): "
            "'studies run' would stop before any cell"
        )
    return "\n".join(lines)
