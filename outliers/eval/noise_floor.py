"""The bfloat16 noise floor: how far the float model's own arithmetic moves its predictions.

The float32 model cast to bfloat16 is scored against the float32 model on the same windows, as a
row of kind ``"noise-floor"`` (``outliers.eval.rows``), and summarized by the agreement measures
the quantized rows report: mean KL, KLD's 99th percentile, top-1 agreement and Δp's RMS
(``outliers.eval.agreement``). A quantized row whose agreement is no worse than this is within
the noise of 16-bit arithmetic; differences between rows below it say little.

It depends only on the model, the tokens and the windows, so it is computed once and kept as a
small JSON file under ``$OUTLIERS_CACHE/noise_floor/``, keyed by content: the model's name, its
weights' SHA-256 where the caller has it and a cheap sample of its parameters' values, the token
ids' SHA-256, the window settings and BOS, the device type and the torch version (bfloat16
kernels differ between them). A file that cannot be read back is moved aside and rebuilt
(``outliers.cache.heal``). A model not in float32 has no noise floor to measure: bfloat16 is its
own arithmetic already, and float16 is never run on a CPU.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from outliers.cache import atomic_write, cache_dir, heal
from outliers.eval.rows import Prepared, Row, RowKind, register_row_kind
from outliers.fingerprint import digest
from outliers.models.load import model_name as loaded_name

if TYPE_CHECKING:
    from outliers.eval.rows import RowEvaluator
    from outliers.eval.windows import PerplexitySettings

__all__ = ["NoiseFloor", "NOISE_FLOOR", "noise_floor", "noise_floor_key", "cached_noise_floor", "bf16_copy"]

NOISE_FLOOR = "noise-floor"  # the row kind
_SAMPLE = 1024  # values read per parameter for the model's fingerprint
_FIELDS = ("kl_vs_ref", "kld_p99", "top1_agreement", "delta_p_rms")


@dataclass(frozen=True)
class NoiseFloor:
    """bfloat16-vs-float32 agreement of one model on one set of windows, or why there is none (``skipped``).

    ``kl_vs_ref``: mean KL(P_fp32 || P_bf16), nats per token; ``kld_p99``: per-token KLD's 99th
    percentile; ``top1_agreement`` and ``delta_p_rms`` as fractions. ``seconds``: what computing it
    cost (set-up and scoring) when it was computed; ``cached``: read from the cache this time.
    """

    kl_vs_ref: float | None = None
    kld_p99: float | None = None
    top1_agreement: float | None = None
    delta_p_rms: float | None = None
    n_windows: int | None = None
    n_tokens: int | None = None
    seconds: float | None = None
    cached: bool = False
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """One line for a table: ``KL …, KLD p99 …, top-1 … %, Δp RMS … %`` and where it came from."""
        if self.skipped:
            return self.skipped
        assert self.kl_vs_ref is not None and self.kld_p99 is not None
        assert self.top1_agreement is not None and self.delta_p_rms is not None
        source = "cached" if self.cached else f"{self.seconds:.1f} s"
        return (
            f"KL {self.kl_vs_ref:.5f}, KLD p99 {self.kld_p99:.5f}, top-1 {100 * self.top1_agreement:.2f} %, "
            f"Δp RMS {100 * self.delta_p_rms:.3f} %  (bf16 vs fp32, same windows; {source})"
        )


def bf16_copy(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model``, cast as ``model.to(torch.bfloat16)`` casts, made without a second
    float32 copy (each parameter is cast on its own into the copy)."""
    memo: dict[int, Any] = {
        id(p): nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=False)
        for p in model.parameters()
        if p.is_floating_point()
    }
    return copy.deepcopy(model, memo=memo).to(torch.bfloat16)  # the float buffers too, as model.to does


def _prepare(row: Row, ev: RowEvaluator) -> Prepared:
    started = time.perf_counter()
    model = bf16_copy(ev.model)
    return Prepared(model, compare=True, setup={"cast_seconds": time.perf_counter() - started})


register_row_kind(RowKind(NOISE_FLOOR, _prepare, "the float model cast to bfloat16: its arithmetic's own noise"))


def _parameter_sample(model: nn.Module) -> str:
    """A cheap fingerprint of the weights: every parameter's name, shape, dtype and ~1k of its values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        if p.device.type != "meta" and p.numel():
            flat = p.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // _SAMPLE)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def noise_floor_key(
    model: nn.Module,
    ids: torch.Tensor,
    settings: PerplexitySettings,
    *,
    bos_token_id: int | None = None,
    model_name: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    """What a noise floor depends on; ``weights``: the weights' SHA-256 where the caller knows it."""
    return {
        "model": model_name if model_name is not None else loaded_name(model),
        "weights_sha256": weights,
        "parameters": _parameter_sample(model),
        "token_ids_sha256": hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest(),
        "settings": asdict(settings),
        "bos_token_id": bos_token_id,
        "device": next(model.parameters()).device.type,
        "torch": torch.__version__,
    }


def _path(key: dict[str, Any]):
    return cache_dir("noise_floor") / f"{digest(key)[:32]}.json"


def cached_noise_floor(key: dict[str, Any]) -> NoiseFloor | None:
    """The noise floor kept for ``key``, or None; a file that cannot be read back is healed and None returned."""
    path = _path(key)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        stored = json.loads(text)
        if stored["key"] != json.loads(json.dumps(key)):
            raise ValueError("its key is not the one it is filed under")
        if not all(isinstance(stored[k], int | float) and not isinstance(stored[k], bool) for k in _FIELDS):
            raise ValueError(f"its fields {', '.join(_FIELDS)} are not all numbers")
        floor = NoiseFloor(**{k: v for k, v in stored.items() if k != "key"})
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        heal(path, e)
        return None
    return NoiseFloor(**(asdict(floor) | {"cached": True}))


def _skip_reason(model: nn.Module) -> str | None:
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return None
    return f"n/a: model loaded in {str(dtype).removeprefix('torch.')}"


def noise_floor(ev: RowEvaluator, *, weights: str | None = None) -> NoiseFloor:
    """The bfloat16 noise floor of ``ev``'s float model on ``ev``'s windows: from the cache, else scored now
    (reusing the reference's kept states, when ``ev`` keeps them) and kept."""
    if reason := _skip_reason(ev.model):
        return NoiseFloor(skipped=reason)
    key = noise_floor_key(
        ev.model, ev.ids, ev.settings, bos_token_id=ev.bos_token_id, model_name=ev.model_name, weights=weights
    )
    if (kept := cached_noise_floor(key)) is not None:
        return kept
    started = time.perf_counter()
    r = ev.evaluate(Row(kind=NOISE_FLOOR)).result
    assert r.kl_vs_ref is not None and r.kld_percentiles is not None  # a compared row
    assert r.top1_agreement is not None and r.delta_p_rms is not None
    floor = NoiseFloor(
        kl_vs_ref=r.kl_vs_ref,
        kld_p99=r.kld_percentiles["99"],
        top1_agreement=r.top1_agreement,
        delta_p_rms=r.delta_p_rms,
        n_windows=r.n_windows,
        n_tokens=r.n_tokens,
        seconds=time.perf_counter() - started,
    )
    atomic_write(_path(key), json.dumps({"key": key} | floor.to_dict(), indent=1) + "\n")
    return floor
