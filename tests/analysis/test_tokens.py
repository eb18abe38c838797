"""Outlier tokens (outliers.analysis.tokens, outliers.quant.prefix): a planted massive activation is listed
with its positions, count and share; PrefixQuant's criterion names the block; the command runs."""

import json

import pytest
import torch
from helpers import make_model

from outliers.analysis.tokens import outlier_tokens, token_table
from outliers.quant.prefix import TokenCounts, choose_prefix, compact_blocks, outlier_flags


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama whose token 7 carries a massive value (3000 in dim 3) from its embedding on, and a text
    holding token 7 at known places (never elsewhere)."""
    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 3] = 3000.0
    ids = torch.randint(8, 384, (640,), generator=torch.Generator().manual_seed(0))
    ids[[0, 70, 75, 300]] = 7  # window 64: window 0 position 0, window 1 positions 6 and 11, window 4 position 44
    return model, ids


def test_a_planted_massive_token_is_listed_with_its_positions_count_and_share(planted):
    model, ids = planted
    report = outlier_tokens(model, ids, window=64, max_windows=8, batch_size=3, progress=False)
    assert report.windows == 8 and report.tokens == 512 and report.counts.blocks == 2
    (rec,) = [r for r in report.records() if r["count_sun"]]  # Sun et al.'s criterion: token 7 alone
    assert rec["token_id"] == 7 and rec["count"] == rec["count_sun"] == 4 and rec["occurrences"] == 4
    assert rec["share"] == 1.0 and rec["at_start"] == 1 and rec["positions"] == [0, 6, 11, 44]
    assert rec["blocks_sun"] == [0, 1] and rec["dim"] == 3 and rec["max_abs"] == pytest.approx(3000, rel=0.01)
    assert report.first_position()["sun"] == 1  # only window 0 starts with it
    counts = TokenCounts()
    x = ids[:128].view(2, 64)
    flags = outlier_flags(model, x)
    counts.add(x, flags)
    counts.add(ids[128:256].view(2, 64), outlier_flags(model, ids[128:256].view(2, 64)))
    assert counts.records()[0]["count"] == 3 and int(counts.occurrences[7]) == 3


def test_prefixquants_criterion_names_the_block_and_position():
    """A value planted at one position of block 1's down-projection input: PrefixQuant flags it there only."""
    model = make_model("llama")
    handle = model.model.layers[1].mlp.act_fn.register_forward_hook(
        lambda m, a, out: out.index_put((torch.tensor([0]), torch.tensor([5]), torch.tensor([2])), torch.tensor(50.0))
    )
    try:
        x = torch.randint(8, 384, (2, 32), generator=torch.Generator().manual_seed(1))
        x[1, 10] = x[0, 5]  # the same token elsewhere, not an outlier there
        flags = outlier_flags(model, x)
    finally:
        handle.remove()
    assert torch.nonzero(flags.prefixquant).tolist() == [[0, 5, 1]]  # window 0, position 5, block 1
    assert not flags.sun.any()
    counts = TokenCounts()
    counts.add(x, flags)
    (rec,) = counts.records()
    assert rec["token_id"] == int(x[0, 5]) and rec["blocks_prefixquant"] == [1] and rec["position"] == 5
    assert rec["count_sun"] == 0 and rec["max_abs"] is None
    # the share counts every occurrence of the id: an outlier at one of its occurrences
    assert rec["occurrences"] == int((x == x[0, 5]).sum()) >= 2 and rec["share"] == 1 / rec["occurrences"]


def test_prefixquants_prefix_is_the_first_token_then_frequent_outlier_tokens(planted):
    model, ids = planted
    report = outlier_tokens(model, ids, window=64, max_windows=8, progress=False, first_token=1)
    # 4 flagged positions over 8 windows: 0.5 a window, rounds to a prefix of one token, the first
    assert choose_prefix(report.counts, 1, criterion="sun") == [1]
    report.counts.flagged_positions["sun"] = 3 * report.windows  # as if 3 a window: the first + token 7
    assert choose_prefix(report.counts, 1, criterion="sun") == [1, 7]
    assert choose_prefix(report.counts, 1, criterion="sun", max_tokens=1) == [1]
    assert compact_blocks([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and compact_blocks([]) == ""


def test_the_table_and_the_json(planted):
    model, ids = planted
    report = outlier_tokens(model, ids, window=64, max_windows=8, progress=False)
    table = token_table(report.records(top=1))
    assert table.iloc[0]["positions"] == "0, 6, 11, 44" and table.iloc[0]["share"] == "100 %"
    d = report.to_dict(top=5)
    assert set(d) >= {"tokens", "criteria", "windows", "tokens_measured", "first_position", "prefix_ids"}
    assert d["windows"] == 8 and d["tokens_measured"] == 512 and set(d["criteria"]) == {"sun", "prefixquant"}
    json.dumps(d)


def test_tokens_command_runs_on_a_model_folder(model_dir, text_file, tmp_path, capsys):
    from outliers.cli import main

    out = tmp_path / "t.json"
    args = ["tokens", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "64"]
    assert main([*args, "--max-windows", "3", "--top", "5", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert record["windows"] == 3 and record["tokens_measured"] == 192 and record["model"]
    assert len(record["tokens"]) <= 5 and "criteria" in record and "prefix" in record
    assert "the window's first position" in printed and "PrefixQuant's prefix from this text" in printed
    assert main([*args, "--max-windows", "0", "--quiet"]) == 2
