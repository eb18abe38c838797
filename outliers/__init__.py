"""outliers: outlier-feature analysis and LLM.int8() for transformer language models.

The flat public API. The package is cut by pipeline stage (README, "Layout"):
``models`` (where weights come from), ``data`` (corpora and token ids),
``arch`` (what each model family looks like), ``analysis`` (hooks,
statistics, criteria), ``quant`` (methods and int8 layers), ``eval``
(perplexity, agreement, intervals), ``cli``. Each name below lives in one
module and is imported on first use, so that ``import outliers`` (and the
command lines) start without torch: entry points set thread settings that
torch reads only when it loads (``outliers.threads``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models.load",
    "LoadedModel": "models.load",
    "ModelInfo": "models.load",
    "list_models": "models.builtin",
    "BUILTIN_MODELS": "models.builtin",
    "load_corpus": "data.corpus",
    "encode_corpus": "data.corpus",
    "Corpus": "data.corpus",
    "perplexity": "eval.perplexity",
    "PerplexityResult": "eval.result",
    "PerplexitySettings": "eval.windows",
    "Int8Linear": "quant.linear",
    "METHODS": "quant.methods",
    "Method": "quant.methods",
    "register_method": "quant.methods",
    "FP8Linear": "quant.emulated",
    "W4A16Linear": "quant.emulated",
    "MXLinear": "quant.mx",
    "quantize_linear": "quant.model",
    "quantize_model": "quant.model",
    "Transform": "quant.transforms",
    "transformed_copy": "quant.calibration",
    "quantized_copy": "quant.model",
    "save_quantized": "quant.model",
    "load_quantized": "quant.model",
    "QuantReport": "quant.model",
    "ARCHITECTURES": "arch.registry",
    "Architecture": "arch.registry",
    "architecture_of": "arch.registry",
    "capture": "analysis.hooks",
    "resolve_points": "analysis.points",
    "CapturePoint": "analysis.points",
    "OutlierStats": "analysis.stats",
    "scan": "analysis.scan",
    "Criteria": "analysis.criteria",
    "per_dim": "analysis.criteria",
    "outlier_features": "analysis.criteria",
    "summary": "analysis.criteria",
    "massive_activations": "analysis.criteria",
    "ablation_study": "analysis.ablate",
    "moments_table": "analysis.moments",
    "quantizability": "analysis.moments",
    "attention_sinks": "analysis.sinks",
    "super_weights": "analysis.superweights",
    "weight_stats": "analysis.weights",
    "kv_channels": "analysis.kvcache",
    "side_by_side": "eval.generate",
    "OutliersError": "errors",
    "UnknownModelError": "errors",
    "MissingPackageError": "errors",
    "ModelFileError": "errors",
    "HubUnavailableError": "errors",
    "CorpusError": "errors",
    "InvalidArgumentError": "errors",
    "OutputPathError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'outliers' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
