"""Computing cells: a worker holds one model and its corpora's token ids, and hands each cell to its measure.

One worker runs in the study's process (``backend="local"``) or as a Ray
actor per model (``studies.ray_backend``). It loads a model once for all of
its cells, tokenizes each corpus once, keeps a cache per (model, corpus) for
each measure (the float model's hidden states and the transformed float
model of the current transform, for perplexity) while its cells run, and returns
every cell's result with its provenance: the weights, the corpus' and the
token ids' hashes and the library versions. A cell that raises is returned
as failed, with its error, and the worker goes on.
"""

from __future__ import annotations

import platform
import traceback
from typing import TYPE_CHECKING, Any

from .config import StudyConfig

if TYPE_CHECKING:
    from .measures import Measure

__all__ = ["Worker", "release_memory"]


def release_memory() -> None:
    """Free what the previous model left before the next one loads.

    A model's modules can sit in reference cycles (freed only by the cycle collector), and glibc keeps
    freed heap in its arenas instead of returning it to the system; ``malloc_trim`` gives it back.
    """
    import ctypes
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


class Worker:
    """Holds one model (and its corpora's token ids) and computes cells of that model.

    ``measures``: the measures it may be asked for (default: the registry as it
    stands); a Ray actor is handed them, so that a measure registered at run
    time reaches it too.
    """

    def __init__(self, cfg: StudyConfig, measures: dict[str, Measure] | None = None, *, progress: bool = False):
        from .measures import MEASURES

        self.cfg = cfg
        self.measures = dict(measures if measures is not None else MEASURES)
        self.progress = progress  # a bar over each cell's work (local runs)
        self.loaded: dict[str, Any] = {}
        self.tokens: dict[tuple[str, str], Any] = {}  # (model, corpus) -> (token ids, corpus SHA-256)
        self.caches: dict[tuple[str, str, str], dict] = {}  # (model, corpus, measure) -> that measure's cache

    def _model(self, name: str):
        from outliers.models.load import load_model

        if name not in self.loaded:
            self.loaded.clear()  # one model in memory at a time
            self.tokens.clear()
            self.caches.clear()
            release_memory()
            self.loaded[name] = load_model(name, dtype=self.cfg.dtype, progress=False)
        return self.loaded[name]

    def run(self, cell: dict[str, Any]) -> tuple[str, dict[str, Any] | None, str | None]:
        """Return ``(status, result, error)``; any exception becomes a failed cell.

        ``result`` holds what the cell's measure computed (arrays for its
        ``BLOB`` columns included), ``n_params`` and ``provenance`` (weights,
        libraries, the token ids' hash).
        """
        import hashlib

        import torch
        import transformers

        from outliers.data.corpus import encode_corpus, load_corpus

        from .measures import Context

        try:
            measure = self.measures[cell["kind"]]
            model, tok, info = self._model(cell["model"])
            tkey = (cell["model"], cell["corpus"])
            if tkey not in self.tokens:
                corpus = load_corpus(cell["corpus"])
                self.tokens[tkey] = encode_corpus(tok, corpus), corpus.sha256
            ids, corpus_sha256 = self.tokens[tkey]
            # cells come grouped by (model, corpus): what the measures kept for another corpus (a transformed
            # copy of the model among it) goes, so one is held at a time
            for key in [k for k in self.caches if k[:2] != tkey]:
                del self.caches[key]
            bos_id = None
            if self.cfg.bos == "window":
                from outliers.data.corpus import bos_token_id

                bos_id = bos_token_id(tok, cell["model"])
            cache = self.caches.setdefault((*tkey, measure.name), {})
            from outliers.quant import gemm

            products = gemm.calls()
            result = measure.compute(cell, Context(self.cfg, model, tok, info, ids, bos_id, cache, self.progress))
            result["n_params"] = info.n_params
            result["provenance"] = {
                "weights": info.weights,
                "weights_sha256": info.weights_sha256,
                "revision": info.revision,
                "corpus_sha256": corpus_sha256,
                "token_ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
            }
            if gemm.calls() > products:  # which exact int8 GEMM ran: provenance, never the key (same numbers)
                result["provenance"]["int8_gemm"] = gemm.record()
            return "done", result, None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - any failure is recorded and the study goes on
            return "failed", None, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
