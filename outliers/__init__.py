"""outliers: outlier-feature analysis and LLM.int8() for transformer language models.

The flat public API; each name lives in a small module of its own and is
imported on first use, so that ``import outliers`` (and the command lines)
start without torch: entry points set thread settings that torch reads only
when it loads (``outliers.threads``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "models", "list_models": "models", "LoadedModel": "models", "ModelInfo": "models",
    "BUILTIN_MODELS": "models",
    "load_corpus": "corpus", "encode_corpus": "corpus", "Corpus": "corpus",
    "perplexity": "perplexity", "PerplexityResult": "perplexity", "PerplexitySettings": "perplexity",
    "Int8Linear": "nn", "METHODS": "nn",
    "quantize_model": "qmodel", "quantized_copy": "qmodel", "save_quantized": "qmodel", "load_quantized": "qmodel",
    "QuantReport": "qmodel",
    "capture": "hooks", "resolve_points": "points", "CapturePoint": "points", "OutlierStats": "stats",
    "scan": "scan",
    "Criteria": "criteria", "per_dim": "criteria", "outlier_features": "criteria", "summary": "criteria",
    "massive_activations": "criteria", "ablation_study": "ablate",
    "OutliersError": "errors", "UnknownModelError": "errors", "MissingPackageError": "errors",
    "ModelFileError": "errors", "HubUnavailableError": "errors", "CorpusError": "errors",
    "InvalidArgumentError": "errors", "OutputPathError": "errors",
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


class _Package(types.ModuleType):
    """Keeps ``outliers.perplexity`` and ``outliers.scan`` the functions once their modules load.

    Importing a submodule sets it as an attribute of its package, which would
    shadow the function of the same name; an eager ``from .perplexity import
    perplexity`` used to overwrite it back.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and _EXPORTS[name] == name and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
