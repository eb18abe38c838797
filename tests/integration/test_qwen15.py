"""Qwen2.5-Coder-1.5B end to end on a CPU: assembled from its 22 checksum-verified chunks, evaluated,
scanned and quantized in bounded memory. Minutes and ~9 GiB: marked slow, run with

    OUTLIERS_CACHE=~/.cache/outliers python -m pytest tests/integration/test_qwen15.py --run-slow

(the cache variable reuses the one-time GGUF conversion instead of redoing it in a scratch cache).
"""

import math
from pathlib import Path

import pytest

from outliers.models.builtin import list_models

NAME = "qwen2.5-coder-1.5b"


def _installed() -> bool:
    return any(m["name"] == NAME and m["installed"] for m in list_models())


pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(not _installed(), reason=f"{NAME} not installed: see `outliers models`"),
]


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def qwen15():
    from outliers import encode_corpus, load_corpus, load_model

    model, tok, info = load_model(NAME, progress=False)
    return model, info, encode_corpus(tok, load_corpus("builtin"))


def test_assembled_and_described(qwen15):
    _, info, _ = qwen15
    assert (info.architecture, info.num_layers, info.hidden_size) == ("qwen2", 28, 1536)
    assert len(info.weights_sha256) == 64 and "GGUF" in info.weights


def test_quantized_cell_in_bounded_memory(qwen15):
    """fp32 and llm.int8 on 2 windows, the int8 model sharing every unquantized tensor; a scan."""
    import torch

    from outliers import PerplexitySettings, perplexity, scan
    from outliers.quant.model import quantized_copy

    model, info, ids = qwen15
    weights = 4 * info.n_params
    fp32 = perplexity(
        model, ids, PerplexitySettings(max_windows=2), progress=False
    )  # every weight read: resident from here on
    Path("/proc/self/clear_refs").write_text("5")
    base = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
    q, report = quantized_copy(model, "llm.int8", 6.0)
    r = perplexity(q, ids, PerplexitySettings(max_windows=2), reference=model, progress=False)
    # the int8 model adds its codes (~0.2 x the float weights) and activations, never a second float copy
    assert _rss_peak() - base < 0.5 * weights
    assert len(report.replaced) == 28 * 7 and report.skipped == ["lm_head"]
    assert math.isfinite(fp32.ppl) and 2 < fp32.ppl < 30
    assert abs(r.delta_ppl_pct) < 5 and r.top1_agreement > 0.9
    assert q.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    del q
    st = scan(model, ids, points="attn,ffn", max_tokens=1024, progress=False)
    from outliers.analysis.stats import Stat

    assert st.meta["tokens_scanned"] == 1024
    absmax = torch.stack([st.get(p.name, Stat.ABSMAX).max() for p in st.points if p.name.endswith("attn_in")])
    assert len(absmax) == 28 and torch.isfinite(absmax).all() and absmax.max() > 6
