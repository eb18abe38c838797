"""``outliers range`` and ``scan --range`` on tiny model folders."""

import json

import pytest

from outliers.cli import main

HEAD = ["block", "attn_in", "attn_out", "ffn_in", "down_in", "residual", "margin", "worst"]  # the per-block table


def test_range_prints_the_table_and_writes_json(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "range.json"
    argv = ["range", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32"]
    assert main([*argv, "--max-windows", "3", "--batch-size", "2", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    for text in (
        "windows  3 windows of 32, bos corpus, 96 tokens",
        "past float16's range (65504): none",
        "past bfloat16's range (3.38953e+38): none",
        "E4M3 (max 448, subnormal 2^-9): per tensor",
        "E5M2 (max 57344, subnormal 2^-16)",
        "runs clean; perplexity",
    ):
        assert text in printed, text
    assert HEAD in [line.split() for line in printed.splitlines()]
    record = json.loads(out.read_text())
    assert record["n_windows"] == 3 and record["window"] == 32 and record["n_tokens"] == 96
    assert record["first_overflow"] == {"float16": None, "bfloat16": None}
    assert record["emulated_float16"]["clean"] and record["emulated_float16"]["first_nonfinite"] is None
    assert record["model_info"]["architecture"] == "llama" and record["corpus_sha256"]
    assert len(record["points"]) == 5 * 2 and 0 <= record["points"][0]["below_fp16_normal"] <= 1


def test_range_no_emulate_and_bad_input(model_dir, text_file, capsys):
    argv = ["range", "--model", str(model_dir("gpt2")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    assert main([*argv, "--max-windows", "1", "--no-emulate"]) == 0
    assert "emulated float16" not in capsys.readouterr().out
    assert main([*argv, "--max-windows", "0"]) == 2
    assert "max_windows must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["opt"])
def test_scan_range_prints_the_same_table_after_the_scan(arch, model_dir, text_file, capsys):
    argv = ["scan", "--model", str(model_dir(arch)), "--corpus", str(text_file), "--window", "32"]
    assert main([*argv, "--max-tokens", "64", "--batch-size", "2", "--range", "--quiet"]) == 0
    printed = capsys.readouterr().out
    scan_part, _, range_part = printed.partition("number-format headroom (2 windows of 32, 64 tokens)")
    assert "outlier features, hidden space" in scan_part
    assert HEAD in [line.split() for line in range_part.splitlines()]
    assert "past float16's range (65504): none" in range_part and "runs clean" in range_part
