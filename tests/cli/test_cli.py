import json
import os
import subprocess
import sys
import time

import pytest

from outliers import PerplexitySettings, encode_corpus, load_corpus, load_model, perplexity
from outliers.cli import main


def run_cli(*args, timeout=60):
    """The installed entry point in a fresh process, as a user would call it."""
    return subprocess.run(
        [sys.executable, "-m", "outliers.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | {"PYTHONWARNINGS": "ignore"},
    )


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("smollm2-135m", "gemma3-270m", "minilm-l6"):
        assert name in out


def test_eval_prints_and_writes_json(model_dir, text_file, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    folder = str(model_dir("gpt2"))
    code = main(
        [
            "eval",
            "--model",
            folder,
            "--corpus",
            str(text_file),
            "--window",
            "64",
            "--max-windows",
            "3",
            "--json",
            str(out_json),
            "--quiet",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    record = json.loads(out_json.read_text())
    for key in (
        "ppl",
        "tokens_per_s",
        "n_tokens",
        "seconds",
        "protocol",
        "window",
        "max_windows",
        "batch_size",
        "model",
        "corpus",
        "dtype",
        "method",
        "model_info",
        "corpus_sha256",
    ):
        assert key in record
    assert record["n_windows"] == 3 and record["window"] == 64 and record["model_info"]["architecture"] == "gpt2"
    assert f"{record['ppl']:.4f}" in printed
    model, tok, _ = load_model(folder, progress=False)
    ids = encode_corpus(tok, load_corpus(str(text_file)))
    assert record["ppl"] == pytest.approx(
        perplexity(model, ids, PerplexitySettings(window=64, max_windows=3), progress=False).ppl
    )


def test_no_such_model_exits_2_fast_with_one_line():
    start = time.monotonic()
    r = run_cli("eval", "--model", "no-such-model")
    assert time.monotonic() - start < 10
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outliers: error: unknown model 'no-such-model'")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "1"], "window must be an integer >= 2"),
        (["--protocol", "sliding", "--window", "8", "--stride", "9"], "stride must be <= window"),
        (["--json", "/no/such/dir/out.json"], "folder /no/such/dir does not exist"),
        (["--model", "/no/such/model.gguf"], "does not exist"),
        (["--corpus", "/no/such/corpus.txt"], "corpus file /no/such/corpus.txt does not exist"),
    ],
    ids=["window", "stride", "json", "model-path", "corpus-path"],
)
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert main(["eval", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_json_folder_and_readonly(tmp_path, capsys):
    assert main(["eval", "--json", str(tmp_path), "--quiet"]) == 2
    assert "is a folder" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere; the check is moot there
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert main(["eval", "--json", str(ro / "x.json"), "--quiet"]) == 2


def test_empty_and_short_corpus(tmp_path, model_dir, capsys):
    empty, short = tmp_path / "empty.txt", tmp_path / "short.txt"
    empty.write_text("\n")
    short.write_text("just a few words")
    folder = str(model_dir("llama"))
    assert main(["eval", "--model", folder, "--corpus", str(empty), "--quiet"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["eval", "--model", folder, "--corpus", str(short), "--window", "64", "--quiet"]) == 2
    assert "fewer than one window of 64" in capsys.readouterr().err


def test_corrupt_gguf_from_cli(tmp_path, capsys):
    bad = tmp_path / "m.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    assert main(["eval", "--model", str(bad), "--quiet"]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err


def test_encoder_refused_for_perplexity(tmp_path, tokenizer, text_file, capsys):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=384,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            architectures=["BertModel"],
        )
    ).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--corpus", str(text_file), "--quiet"]) == 2
    assert "is an encoder (bert)" in capsys.readouterr().err


def test_eval_method_and_table(model_dir, text_file, tmp_path, capsys):
    folder = str(model_dir("opt"))
    out = tmp_path / "all.json"
    assert (
        main(
            [
                "eval",
                "--model",
                folder,
                "--corpus",
                str(text_file),
                "--window",
                "32",
                "--max-windows",
                "2",
                "--method",
                "all",
                "--threshold",
                "1.5",
                "--calib-windows",
                "2",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    from outliers.quant.methods import METHODS

    in_all = [m for m, spec in METHODS.items() if spec.in_all]  # the microscaling rows are --method formats
    assert [r["method"] for r in records][:2] == ["fp32", "absmax"] and len(records) == 1 + len(in_all) + 1
    assert "| 32-bit float" in printed and "| zeropoint LLM.int8()" in printed
    assert "| SmoothQuant (smooth 0.5, absmax vector-wise)" in printed  # the usual pairing, last
    assert records[-1]["extra"]["smooth"] == 0.5 and records[-1]["extra"]["calib_tokens"] == 64
    llm = next(r for r in records if r["method"] == "llm.int8")
    assert records[0]["kl_vs_ref"] is None and llm["kl_vs_ref"] >= 0 and 0 <= llm["top1_agreement"] <= 1
    # one reference for all methods, on the same windows
    assert all(r["ref_ppl"] == pytest.approx(records[0]["ppl"]) for r in records[1:])
    assert llm["extra"]["threshold"] == 1.5 and llm["extra"]["skipped"] == ["lm_head"]
    assert llm["extra"]["weight_bytes_after"] < llm["extra"]["weight_bytes_before"] / 3
    assert (
        main(
            [
                "eval",
                "--model",
                folder,
                "--corpus",
                str(text_file),
                "--window",
                "32",
                "--max-windows",
                "2",
                "--method",
                "llm.int8",
                "--round-to",
                "float16",
                "--quiet",
            ]
        )
        == 0
    )
    assert "llm.int8 (threshold 6.0)" in capsys.readouterr().out


def test_eval_quantized_writes_intervals_and_agreement(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir("llama")),
                "--corpus",
                str(text_file),
                "--window",
                "32",
                "--max-windows",
                "6",
                "--method",
                "llm.int8",
                "--threshold",
                "0.5",
                "--round-to",
                "float16",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    r = json.loads(out.read_text())
    for key in (
        "ppl_ci95",
        "delta_ppl_pct",
        "delta_ppl_pct_ci95",
        "kl_vs_ref",
        "kl_vs_ref_ci95",
        "top1_agreement",
        "top1_agreement_ci95",
        "window_nll",
        "window_tokens",
    ):
        assert r[key] is not None, key
    assert r["ref_dtype"] == "fp32" and len(r["window_nll"]) == 6
    assert r["ppl_ci95"][0] <= r["ppl"] <= r["ppl_ci95"][1]
    assert r["top1_agreement_ci95"][0] <= r["top1_agreement"] <= r["top1_agreement_ci95"][1]
    assert "95 % CI over 6 windows" in captured.out and "KL vs reference" in captured.out
    assert "only 6 windows" in captured.err


def test_eval_bos_window_needs_a_bos_token(model_dir, text_file, capsys):
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir("llama")),
                "--corpus",
                str(text_file),
                "--window",
                "32",
                "--max-windows",
                "2",
                "--bos",
                "window",
                "--quiet",
            ]
        )
        == 2
    )
    assert "--bos window needs a BOS token" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "int4"], "unknown method 'int4'"),
        (["--method", "llm.int8", "--threshold", "-2"], "threshold must be >= 0"),
    ],
    ids=["method", "threshold"],
)
def test_bad_method_arguments(args, message, capsys):
    assert main(["eval", *args, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_scan_writes_tables_and_figures(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "scan"
    assert (
        main(
            [
                "scan",
                "--model",
                str(model_dir("llama")),
                "--corpus",
                str(text_file),
                "--max-tokens",
                "256",
                "--window",
                "64",
                "--points",
                "attn,ffn,residual",
                "--threshold",
                "1.5",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "outlier features, hidden space, absolute criterion" in printed and "|x| >= 1.5" in printed
    for f in (
        "stats.json",
        "stats.safetensors",
        "summary.csv",
        "per_dim_hidden.csv",
        "per_dim_heads.csv",
        "outlier_features_absolute.csv",
        "top_values.csv",
        "massive_activations.csv",
        "heatmap_hidden.png",
        "histogram_hidden.png",
        "layers_vs_positions.png",
        "moments.csv",
        "kurtosis.png",
    ):
        assert (out / f).stat().st_size > 0, f
    assert "block outputs: max ∞-norm" in printed and "attn_in token kurtosis" in printed
    import pandas as pd

    top = pd.read_csv(out / "top_values.csv")
    assert {"point", "layer", "dim", "value", "position", "token"} <= set(top.columns) and len(top) == 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "--threshold", "0"], "threshold must be > 0"),
        (["scan", "--points", "mlp"], "unknown capture point 'mlp'"),
        (["scan", "--layers", "25"], "layers is a fraction in [0, 1]"),
        (["ablate", "--dims", "a,b"], "--dims must be 'auto' or a comma list"),
    ],
    ids=["threshold", "points", "layers", "dims"],
)
def test_scan_and_ablate_bad_input(args, message, capsys):
    assert main([*args, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_ablate_cli_on_explicit_dims(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ablate.json"
    assert (
        main(
            [
                "ablate",
                "--model",
                str(model_dir("opt")),
                "--corpus",
                str(text_file),
                "--dims",
                "3,5",
                "--window",
                "32",
                "--max-windows",
                "2",
                "--controls",
                "1",
                "--json",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [r["condition"] for r in rows] == ["baseline", "selected", "random #1"] and rows[1]["dims"] == [3, 5]
    assert (
        main(
            [
                "ablate",
                "--model",
                str(model_dir("opt")),
                "--corpus",
                str(text_file),
                "--dims",
                "99",
                "--window",
                "32",
                "--max-windows",
                "1",
                "--quiet",
            ]
        )
        == 2
    )
    assert "out of range" in capsys.readouterr().err


# ---------------------------------------------------------------- --quantize-lm-head, set-up apart from speed


def _tied_llama():
    """A tiny Llama whose lm_head is the input embedding (as SmolLM2's, Gemma's and Qwen's are)."""
    import torch
    from helpers import make_config
    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    return model


def test_quantized_lm_head_leaves_the_tied_embedding_alone():
    import torch

    from outliers.arch.lmhead import split_lm
    from outliers.arch.registry import quantize_skip
    from outliers.quant.linear import Int8Linear
    from outliers.quant.model import quantized_copy

    model = _tied_llama()
    emb = model.get_input_embeddings().weight
    before = emb.detach().clone()
    assert quantize_skip(model, False) is None  # the architecture's skip: the head stays float
    q, report = quantized_copy(model, "llm.int8", 6.0, skip=quantize_skip(model, True))
    assert "lm_head" in report.replaced and report.skipped == []
    assert isinstance(q.get_output_embeddings(), Int8Linear) and split_lm(q).head.out_features == 384
    assert q.get_input_embeddings().weight is emb  # the lookup reads the shared float tensor, untouched
    assert torch.equal(emb, before)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is emb  # the float model still tied
    x = torch.randint(0, 384, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = model(input_ids=x).logits, q(input_ids=x).logits
        split = split_lm(q)
        torch.testing.assert_close(split.logits(split.hidden(x)), out)  # the chunked head is the model's head
    assert float((out - ref).norm() / ref.norm()) < 0.03
    float_head, _ = quantized_copy(model, "llm.int8", 6.0)
    with torch.inference_mode():
        assert not torch.equal(float_head(input_ids=x).logits, out)  # the head's quantization does change them


def test_quantize_lm_head_needs_a_linear_head():
    from helpers import make_config
    from transformers import AutoModel

    from outliers.arch.registry import quantize_skip
    from outliers.errors import InvalidArgumentError

    body = AutoModel.from_config(make_config("llama"))  # no output head at all
    with pytest.raises(InvalidArgumentError, match="no linear output head"):
        quantize_skip(body, True)


def test_eval_quantize_lm_head_and_set_up_apart(tmp_path, tokenizer, text_file, capsys):
    folder = tmp_path / "tied"
    _tied_llama().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "r.json"
    args = ["eval", "--model", str(folder), "--corpus", str(text_file), "--window", "32", "--max-windows", "6"]
    assert main([*args, "--method", "llm.int8", "--quantize-lm-head", "--json", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["extra"]["skipped"] == [] and r["extra"]["replaced"] == 2 * 7 + 1
    assert r["extra"]["load_seconds"] > 0 and r["extra"]["quantize_seconds"] > 0
    assert 0 < r["warmup_seconds"] < r["seconds"] and r["steady_tokens_per_s"] > 0
    assert "steady state, after the first batch" in printed and "quantize" in printed and "first batch" in printed
    assert main([*args, "--method", "fp32,llm.int8", "--quantize-lm-head", "--quiet"]) == 0
    assert "lm_head quantized" in capsys.readouterr().out
    assert main([*args, "--max-windows", "2", "--quiet"]) == 0  # one batch of four: no steady state to report
    assert "one batch: includes its warm-up" in capsys.readouterr().out


def test_eval_names_a_bf16_baseline_bf16(model_dir, text_file, capsys):
    folder = str(model_dir("llama"))
    common = ["eval", "--model", folder, "--corpus", str(text_file), "--window", "32", "--max-windows", "2"]
    assert main([*common, "--dtype", "bfloat16", "--quiet"]) == 0
    single = capsys.readouterr().out
    assert "bf16" in single and "fp32" not in single
    assert main([*common, "--dtype", "bfloat16", "--method", "fp32,llm.int8", "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| bfloat16" in table and "vs bf16" in table and "32-bit float" not in table


def test_eval_int8_gemm_forced_backends_agree_to_the_last_digit(model_dir, text_file, tmp_path, capsys, monkeypatch):
    from outliers.quant.gemm import ENV

    monkeypatch.setenv(ENV, "")  # restored after the test: the flag below pins the variable for the process
    results = {}
    for name in ("float32", "int16"):
        out = tmp_path / f"{name}.json"
        argv = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32"]
        argv += ["--max-windows", "3", "--method", "llm.int8", "--threshold", "0.5", "--int8-gemm", name]
        assert main([*argv, "--json", str(out), "--quiet"]) == 0
        assert f"int8 GEMM        {name} (forced by ${ENV})" in capsys.readouterr().out
        results[name] = json.loads(out.read_text())
        monkeypatch.setenv(ENV, "")
    a, b = results["float32"], results["int16"]
    assert a["extra"]["int8_gemm"]["backend"] == "float32" and b["extra"]["int8_gemm"]["backend"] == "int16"
    for key in ("ppl", "nll", "kl_vs_ref", "top1_agreement", "window_nll"):
        assert a[key] == b[key], key


def test_unknown_int8_gemm_is_one_line_naming_the_choices(capsys):
    assert main(["eval", "--int8-gemm", "turbo", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown int8 GEMM backend 'turbo'; available: int_mm, float32, int16" in err and len(err.splitlines()) == 1


def test_env_prints_machine_facts_and_backends(tmp_path, capsys):
    assert main(["env", "--json", str(tmp_path / "env.json")]) == 0
    out = capsys.readouterr().out
    for word in ("cpu", "flags", "threads", "torch", "int_mm", "float32", "int16", "choice:"):
        assert word in out
    facts = json.loads((tmp_path / "env.json").read_text())
    assert set(facts["exact"]) == {"int_mm", "float32", "int16"} and facts["large"] in facts["exact"]
