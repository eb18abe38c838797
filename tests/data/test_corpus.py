import sys

import pytest
import torch

from outliers import CorpusError, MissingPackageError, encode_corpus, load_corpus
from outliers.data.corpus import tokenizer_fingerprint


def test_builtin_is_the_shipped_text_checked_by_sha256():
    from outliers.data.corpus import BUILTIN_SHA256

    a, b = load_corpus("builtin"), load_corpus()
    assert a == b and a.name == "builtin" and a.sha256 == BUILTIN_SHA256
    assert len(a.text) == 1_295_117 and a.text.startswith("Ulysses S. Grant, Annual Message to Congress")
    assert "public domain" in a.source


def test_damaged_builtin_is_refused(tmp_path, monkeypatch):
    import gzip

    from outliers.data import corpus as corpus_mod

    edited = tmp_path / "builtin.txt.gz"
    edited.write_bytes(gzip.compress(load_corpus("builtin").text.replace("Congress", "Kongress", 1).encode()))
    monkeypatch.setattr(corpus_mod, "BUILTIN_FILE", edited)
    with pytest.raises(CorpusError, match="damaged or edited"):
        load_corpus("builtin")
    edited.write_bytes(b"not gzip")
    with pytest.raises(CorpusError, match="cannot be read"):
        load_corpus("builtin")


def test_pydoc_topics_stays_available_under_its_own_name():
    c = load_corpus("pydoc-topics")
    assert c.name == "pydoc-topics" and len(c.text) > 400_000 and "Python" in c.source


def test_text_file(text_file):
    c = load_corpus(str(text_file))
    assert c.text == text_file.read_text() and c.name == "sample.txt"
    assert "chars=" in repr(c) and c.text[:50] not in repr(c)


@pytest.mark.parametrize("content", ["", "  \n\n\t "], ids=["empty", "whitespace"])
def test_empty_corpus(tmp_path, content):
    f = tmp_path / "e.txt"
    f.write_text(content)
    with pytest.raises(CorpusError, match="is empty"):
        load_corpus(str(f))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(CorpusError, match="is a folder"):
        load_corpus(str(tmp_path))


def test_not_utf8(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(str(f))


def test_hf_spec_shape():
    with pytest.raises(CorpusError, match=r"hf:NAME\[:CONFIG\]:SPLIT"):
        load_corpus("hf:wikitext")


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(MissingPackageError, match="pip install datasets"):
        load_corpus("hf:wikitext:wikitext-2-raw-v1:test")


def test_encode_is_cached_on_disk(tokenizer, text_file, monkeypatch, tmp_path):
    monkeypatch.setenv("OUTLIERS_CACHE", str(tmp_path))
    corpus = load_corpus(str(text_file))
    ids = encode_corpus(tokenizer, corpus)
    assert ids.dtype == torch.int64 and ids.dim() == 1
    assert ids.tolist() == tokenizer(corpus.text)["input_ids"]
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 1
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(1))
    assert torch.equal(encode_corpus(tokenizer, corpus), ids) and not calls


def test_fingerprint_tells_tokenizers_apart(tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(PreTrainedTokenizerFast(tokenizer_object=other))
