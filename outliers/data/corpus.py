"""Text corpora and their token ids: ``load_corpus(spec)``, ``encode_corpus(tok, corpus)``.

Specs:
    ``builtin``               the twenty US Presidents' Annual Messages to Congress of
                              1870-1889 (public domain; 1.3M characters, 259,508
                              SmolLM2 tokens), shipped with the package and checked
                              against its SHA-256 at every load; always offline.
                              Source and licence: ``outliers/data/BUILTIN_CORPUS.md``.
    ``pydoc-topics``          the stdlib's ``pydoc_data.topics`` texts (the built-in
                              corpus before 0.2): differs between Python builds.
    a path                    any UTF-8 text file (e.g. WikiText-2's ``wiki.test.raw``).
    ``hf:NAME[:CONFIG]:SPLIT`` a Hugging Face dataset's ``text`` column joined with
                              blank lines (the HF perplexity guide's convention);
                              needs ``datasets`` and a reachable hub or local cache.

Token ids are computed once per (tokenizer, text) and cached as ``.npy``
under ``$OUTLIERS_CACHE/tokens``, keyed by hashes of both, so a study or a
notebook never re-tokenizes the same corpus.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outliers.cache import atomic_file, cache_dir, heal
from outliers.errors import CorpusError, HubUnavailableError, InvalidArgumentError, MissingPackageError

__all__ = ["Corpus", "load_corpus", "encode_corpus", "tokenizer_fingerprint", "bos_token_id"]

SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """A named text. ``sha256`` identifies the exact text, for caches and reports."""

    name: str
    text: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:  # the text can be megabytes: never print it whole
        return f"Corpus(name={self.name!r}, chars={len(self.text)}, source={self.source!r})"


BUILTIN_FILE = Path(__file__).parent / "builtin.txt.gz"
BUILTIN_SHA256 = "03635e03ff07f3ecb7e9dcaf345f6285adc2f5c80fd1bccf8fbe6f1ec1900078"


def _builtin() -> Corpus:
    # Shipped with the package and checked, so that every number on `builtin` means
    # the same text on every machine (the stdlib's pydoc text differs between builds).
    try:
        text = gzip.decompress(BUILTIN_FILE.read_bytes()).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"the built-in corpus {BUILTIN_FILE} cannot be read ({e}); reinstall outliers") from e
    corpus = Corpus("builtin", text, "US Presidents' Annual Messages to Congress 1870-1889 (public domain)")
    if corpus.sha256 != BUILTIN_SHA256:
        raise CorpusError(
            f"the built-in corpus {BUILTIN_FILE} has SHA-256 {corpus.sha256}, expected "
            f"{BUILTIN_SHA256}: the file is damaged or edited; reinstall outliers"
        )
    return corpus


def _pydoc_topics() -> Corpus:
    from pydoc_data.topics import topics

    # Sorted keys: dict order is an implementation detail of one Python build. The text
    # itself still differs between Python builds (even patch releases): check corpus.sha256.
    text = SEPARATOR.join(topics[k].strip() for k in sorted(topics))
    return Corpus("pydoc-topics", text, f"pydoc_data.topics of Python {platform.python_version()}")


def _hf(spec: str) -> Corpus:
    fields = spec[3:].split(":")
    if len(fields) not in (2, 3) or not all(fields):
        raise CorpusError(f"hf corpus spec must be hf:NAME[:CONFIG]:SPLIT, got {spec!r}")
    name, config, split = (fields[0], None, fields[1]) if len(fields) == 2 else fields
    try:
        import datasets
    except ImportError:
        raise MissingPackageError(f"corpus {spec!r} needs the 'datasets' package: pip install datasets") from None
    from outliers.models.hub import hub_reachable

    try:  # local cache first, so a downloaded dataset works offline
        ds = datasets.load_dataset(name, config, split=split, download_mode="reuse_dataset_if_exists")
    except Exception as first:
        if not hub_reachable():
            raise HubUnavailableError(
                f"cannot load dataset {spec!r}: the hub is not reachable and it is not cached "
                "locally; pass a text file instead"
            ) from first
        raise CorpusError(f"could not load dataset {spec!r}: {first}") from first
    if "text" not in ds.column_names:
        raise CorpusError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return Corpus(spec, SEPARATOR.join(ds["text"]), spec)


def _file(spec: str) -> Corpus:
    path = Path(spec).expanduser()
    if not path.exists():
        raise CorpusError(f"corpus file {spec} does not exist (or use 'builtin' or hf:NAME[:CONFIG]:SPLIT)")
    if path.is_dir():
        raise CorpusError(f"corpus path {spec} is a folder; pass a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {spec} is not UTF-8 text: {e}") from e
    return Corpus(path.name, text, str(path.resolve()))


def load_corpus(spec: str = "builtin") -> Corpus:
    """Return the corpus named by ``spec`` (see the module docstring).

    Raises:
        CorpusError: missing, undecodable or empty (whitespace only) text.
        MissingPackageError, HubUnavailableError: for ``hf:`` specs.
    """
    if spec == "builtin":
        corpus = _builtin()
    elif spec == "pydoc-topics":
        corpus = _pydoc_topics()
    elif spec.startswith("hf:"):
        corpus = _hf(spec)
    else:
        corpus = _file(spec)
    if not corpus.text.strip():
        raise CorpusError(f"corpus {spec} is empty")
    return corpus


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return a hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        desc = backend.to_str()
    else:  # slow tokenizers: the vocabulary and the class stand in for the rules
        desc = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    extra = json.dumps(
        [type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    )
    return hashlib.sha256((desc + extra).encode("utf-8")).hexdigest()


def encode_corpus(tokenizer: Any, corpus: Corpus, *, cache: bool = True) -> torch.Tensor:
    """Return the corpus' token ids, shape ``(n_tokens,)``, int64.

    The whole text is tokenized at once with the tokenizer's default special
    tokens (a BOS at the start where the tokenizer adds one), as the HF
    perplexity guide does; windows are slices of this one sequence.
    """
    path = cache_dir("tokens") / f"{tokenizer_fingerprint(tokenizer)[:20]}-{corpus.sha256[:20]}.npy"
    if cache and path.exists():
        try:
            return torch.from_numpy(_load_ids(path, len(tokenizer)))
        except (OSError, ValueError, EOFError) as e:  # truncated, garbage, empty: tokenize again
            heal(path, e)
    ids = tokenizer(corpus.text, return_attention_mask=False, verbose=False)["input_ids"]
    ids = np.asarray(ids, dtype=np.int64)
    if cache:  # a unique scratch moved into place: concurrent encoders each leave a whole file
        with atomic_file(path) as f:
            np.save(f, ids.astype(np.int32) if ids.max(initial=0) < 2**31 else ids, allow_pickle=False)
    return torch.from_numpy(ids)


def _load_ids(path: Path, vocab: int) -> np.ndarray:
    """Read cached token ids, checked: one dimension, integers, inside the vocabulary."""
    ids = np.load(path, allow_pickle=False)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or not len(ids):
        raise ValueError(f"not a token-id array ({ids.dtype}, shape {ids.shape})")
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"token ids outside the vocabulary of {vocab}")
    return ids.astype(np.int64)


def bos_token_id(tokenizer: Any, model: str = "") -> int:
    """Return the tokenizer's BOS id, for the ``bos="window"`` protocol.

    Raises:
        InvalidArgumentError: the tokenizer has no BOS token.
    """
    if getattr(tokenizer, "bos_token_id", None) is None:
        raise InvalidArgumentError(
            f"--bos window needs a BOS token, and the tokenizer of '{model or 'this model'}' has none; use --bos corpus"
        )
    return tokenizer.bos_token_id
