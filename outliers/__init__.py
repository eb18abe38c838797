"""outliers: outlier-feature analysis and LLM.int8() for transformer language models.

The flat public API; each name lives in a small module of its own.
"""

from .corpus import Corpus, encode_corpus, load_corpus
from .errors import (
    CorpusError,
    HubUnavailableError,
    InvalidArgumentError,
    MissingPackageError,
    ModelFileError,
    OutliersError,
    OutputPathError,
    UnknownModelError,
)
from .models import BUILTIN_MODELS, LoadedModel, ModelInfo, list_models, load_model
from .perplexity import PerplexityResult, PerplexitySettings, perplexity
from .nn import METHODS, Int8Linear
from .qmodel import QuantReport, load_quantized, quantize_model, save_quantized
from .hooks import capture
from .points import CapturePoint, resolve_points
from .stats import OutlierStats
from .criteria import Criteria, massive_activations, outlier_features, per_dim, summary
from .scan import scan
from .ablate import ablation_study

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model", "list_models", "LoadedModel", "ModelInfo", "BUILTIN_MODELS",
    "load_corpus", "encode_corpus", "Corpus",
    "perplexity", "PerplexityResult", "PerplexitySettings",
    "Int8Linear", "METHODS", "quantize_model", "save_quantized", "load_quantized", "QuantReport",
    "capture", "resolve_points", "CapturePoint", "OutlierStats", "scan",
    "Criteria", "per_dim", "outlier_features", "summary", "massive_activations", "ablation_study",
    "OutliersError", "UnknownModelError", "MissingPackageError", "ModelFileError",
    "HubUnavailableError", "CorpusError", "InvalidArgumentError", "OutputPathError",
]
