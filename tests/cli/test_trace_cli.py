"""``outliers trace`` on the planted chain (tests/helpers.py: ``planted_chain``) saved with a tokenizer whose BOS
opens it: the chain printed and written, every edit's fields with their changes and intervals, the figure."""

import json

import pytest
from helpers import CHAIN, save_planted_chain

from outliers.cli import main
from outliers.cli.trace import EDITS


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("chain")
    save_planted_chain(folder, tokenizer)  # --bos window starts every window with the BOS that opens the chain
    return folder


def test_trace_json_out_and_print(chain_dir, text_file, tmp_path, capsys):
    path, out = tmp_path / "t.json", tmp_path / "trace"
    args = ["trace", "--model", str(chain_dir), "--corpus", str(text_file), "--window", "32", "--max-windows", "3"]
    assert main([*args, "--batch-size", "3", "--bos", "window", "--json", str(path), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "super weight      W[5, 9] of block 1" in printed and "massive           dim 5: born at block 1" in printed
    assert "1 of 16 heads" in printed and "llm.int8 KL" in printed and "cost:" in printed
    d = json.loads(path.read_text())
    assert d["bos"] == "window" and d["n_windows"] == 3 and d["settings"]["rows"] == ["llm.int8"]
    assert [e["edit"] for e in d["edits"]] == list(EDITS)
    fields = ["massive_activation", "sink_rate", "first_token_attention", "key_concentration", "ppl"]
    fields.append("kl_vs_ref_llm_int8")
    for e in d["edits"]:
        for f in fields:
            assert isinstance(e[f], float), (e["edit"], f)
            if e["edit"] != "none":
                assert isinstance(e[f"{f}_delta"], float) and len(e[f"{f}_delta_ci95"]) == 2, (e["edit"], f)
    by = {e["edit"]: e for e in d["edits"]}
    assert by["clamp_massive"]["sink_rate"] == 0 and by["clamp_control"]["sink_rate"] == by["none"]["sink_rate"]
    c = d["chain"]
    assert c["super_weights"][0]["col"] == CHAIN["col"] and c["massive"][0]["dim"] == CHAIN["row"]
    share = c["kl_share"]["llm.int8"]
    assert share["token_share"] == pytest.approx(1 / 31) and share["kl_share_ci95"] is not None
    for f in ("lifecycle.png", "edits.csv", "heads.csv", "key_layers.csv"):
        assert (out / f).stat().st_size > 0, f


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--edits", "none,prune"], "unknown edit"),
        (["--edits", "clamp_massive"], "must include 'none'"),
        (["--rows", "int3"], "int3"),
        (["--window", "2"], "window must be >= 3"),
    ],
)
def test_trace_bad_input_fails_before_loading(extra, message, capsys):
    assert main(["trace", "--model", "no-such-model", *extra, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_the_command_offers_the_analysis_edits():
    from outliers.analysis.lifecycle_edits import EDITS as ANALYSIS_EDITS

    assert EDITS == ANALYSIS_EDITS
