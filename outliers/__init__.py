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

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load_model", "list_models", "LoadedModel", "ModelInfo", "BUILTIN_MODELS",
    "load_corpus", "encode_corpus", "Corpus",
    "perplexity", "PerplexityResult", "PerplexitySettings",
    "OutliersError", "UnknownModelError", "MissingPackageError", "ModelFileError",
    "HubUnavailableError", "CorpusError", "InvalidArgumentError", "OutputPathError",
]
