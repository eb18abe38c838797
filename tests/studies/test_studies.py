import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from outliers import InvalidArgumentError
from studies.cli import main
from studies.config import load_config
from studies.report import status, write_report
from studies.runner import cells, run_study
from studies.store import Store


def write_config(tmp_path, model, corpus, **extra):
    lines = ["[study]", 'name = "tiny"', f'models = ["{model}"]', f'corpora = ["{corpus}"]']
    defaults = {
        "methods": '["llm.int8", "absmax"]',
        "thresholds": "[0, 2, 6]",
        "window": "32",
        "max_windows": "2",
        "batch_size": "2",
    }
    defaults.update(extra)
    lines += [f"{k} = {v}" for k, v in defaults.items()]
    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_builtin_configs_parse():
    cfg = load_config("studies/configs/threshold_ablation.toml")
    assert cfg.models == ("smollm2-135m",) and cfg.thresholds[-1] == 16.0
    assert len(cells(cfg)) == 1 + 2 * 10
    for name in ("methods", "scale"):
        assert load_config(f"studies/configs/{name}.toml").models == ("installed",)
    grid = cells(load_config("studies/configs/methods.toml"))
    per_model = 1 + 11 + 4  # fp32, every registered method, SmoothQuant and three int8 rows after a rotation
    assert len(grid) == per_model * len({c["model"] for c in grid})
    assert "llm.int8@hadamard" in {c["method"] for c in grid}
    transforms = load_config("studies/configs/smoothing_vs_decomposition.toml")
    assert len(cells(transforms)) == 1 + 3 * 6  # fp32; llm.int8 as is, after smooth 0.5, after hadamard


def test_installed_expands_to_installed_causal_builtins(monkeypatch):
    from outliers.models import builtin as models_mod
    from studies.runner import expand_models

    rows = [
        {"name": "a", "installed": True, "kind": "causal"},
        {"name": "b", "installed": False, "kind": "causal"},
        {"name": "c", "installed": True, "kind": "encoder"},
    ]
    monkeypatch.setattr(models_mod, "list_models", lambda: rows)
    assert expand_models(("installed", "org/hub-model", "a")) == ["a", "org/hub-model"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("colour = 3", "unknown key 'colour' in [study]"),
        ('window = "512"', "[study] window must be int, got str"),
        ('methods = ["int4"]', "unknown method 'int4'"),
        ('thresholds = ["six"]', "thresholds must be a list of int or float"),
        ("window = 1", "window must be an integer >= 2"),
    ],
    ids=["unknown-key", "type", "method", "item-type", "range"],
)
def test_bad_configs_name_key_and_file(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[study]\nname = "x"\nmodels = ["m"]\n{line}\n')
    with pytest.raises(InvalidArgumentError, match=str(path)) as e:
        load_config(path)
    assert message in str(e.value)


def test_run_resume_status_and_report(tmp_path, model_dir, text_file, monkeypatch):
    from outliers.quant.gemm import ENV

    cfg = load_config(write_config(tmp_path, model_dir("llama"), text_file, measure='["perplexity", "outliers"]'))
    out = tmp_path / "out"
    monkeypatch.setenv(ENV, "float32")
    first = run_study(cfg, out, progress=False)
    assert first == {"done": 1 + 3 + 1 + 1, "failed": 0, "skipped": 0, "stale": 0}  # fp32, llm.int8 x3, absmax, scan
    monkeypatch.setenv(ENV, "int16")  # another backend, the same arithmetic: the cells are still valid
    again = run_study(cfg, out, progress=False)
    assert again == {"done": 0, "failed": 0, "skipped": 6, "stale": 0}
    st = status(out)
    assert (st.state == "done").all() and len(st) == 6
    report = write_report(out)
    text = report.read_text()
    assert "32-bit float" in text and "absmax LLM.int8()" in text and (out / "threshold_curves.png").exists()
    for t in ("0", "2", "6"):  # one Table-1 block per threshold of the grid
        assert f"### Decomposition threshold {t}" in text and (out / f"table1_t{t}.csv").exists()
    assert "## Settings" in text and "## Agreement with the float model" in text
    assert "Table-4 layout; |x| >= 6" in text and (out / "table4.csv").exists()
    assert "llm.int8 ppl (t=2)" in (out / "table4.csv").read_text()
    assert "## Kurtosis and ∞-norm" in text and "max ∞-norm" in (out / "kurtosis.csv").read_text()
    rows = Store(out).frame()
    scanned = rows[rows.kind == "outliers"].iloc[0].result["moments"]
    assert scanned["layers"] == 2 and scanned["max_inf_norm"] > 0 and scanned["avg_kurtosis"] > 1
    q = rows[rows.method == "llm.int8"].iloc[0]
    assert q.result["kl_vs_ref"] >= 0 and q.result["delta_ppl_pct_ci95"] and q.fingerprint
    assert q.provenance["weights_sha256"] and q.provenance["token_ids_sha256"] and q.provenance["corpus_sha256"]
    assert q.provenance["int8_gemm"]["backend"] == "float32" and q.provenance["int8_gemm"]["how"] == "forced"
    nll = Store(out).token_nll(q.key)
    assert len(nll) == q.n_tokens and abs(nll.astype(float).sum() / q.n_tokens - q.result["nll"]) < 1e-5


def test_failed_cells_are_recorded_and_the_study_goes_on(tmp_path, model_dir, text_file):
    cfg = load_config(write_config(tmp_path, "no-such-model", text_file, methods='["absmax"]', thresholds="[6]"))
    counts = run_study(cfg, tmp_path / "out", progress=False)
    assert counts == {"done": 0, "failed": 2, "skipped": 0, "stale": 0}
    df = Store(tmp_path / "out").frame()
    assert (df.status == "failed").all() and df.error.str.contains("unknown model 'no-such-model'").all()


def test_a_killed_study_keeps_its_rows_and_resumes(tmp_path, model_dir, text_file):
    """SIGKILL a study in a child process after its first stored cell, then finish it."""
    cfg_path = write_config(tmp_path, model_dir("gpt2"), text_file, thresholds="[0, 1, 2, 3, 4, 6]", max_windows="4")
    out = tmp_path / "out"
    env = os.environ | {"PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(
        [sys.executable, "-m", "studies.cli", "run", str(cfg_path), "--out", str(out), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    db = out / "results.sqlite"
    deadline = time.monotonic() + 60
    n_before = 0
    while time.monotonic() < deadline and child.poll() is None:
        if db.exists():
            try:
                n_before = sqlite3.connect(db).execute("SELECT count(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:
                n_before = 0
            if n_before >= 2:
                break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    total = len(cells(load_config(cfg_path)))
    rows = Store(out).frame()
    assert 2 <= len(rows) < total, "the child was killed mid-study"
    kept = dict(zip(rows.key, rows.finished_at, strict=True))
    counts = run_study(load_config(cfg_path), out, progress=False)
    assert counts["skipped"] == len(kept) and counts["done"] == total - len(kept)
    after = Store(out).frame()
    assert len(after) == total and (after.status == "done").all()
    assert all(after.set_index("key").finished_at[k] == t for k, t in kept.items())  # not recomputed


def test_cli_list_status_and_errors(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "threshold_ablation" in capsys.readouterr().out
    assert main(["status", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a study folder" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read study config" in capsys.readouterr().err


def test_cli_sets_ray_auth_mode_for_a_private_cluster_only(tmp_path, monkeypatch):
    """The entry point sets RAY_AUTH_MODE; run_study (library code) only reads the environment."""
    from studies import runner

    seen = []
    monkeypatch.setattr(
        runner,
        "run_study",
        lambda *a, **kw: (
            seen.append(os.environ.get("RAY_AUTH_MODE")) or {"done": 0, "failed": 0, "skipped": 0, "stale": 0}
        ),
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "unset")
    monkeypatch.delenv("RAY_AUTH_MODE")  # restored to its state before the test when it ends
    path = write_config(tmp_path, "m", "builtin")
    assert main(["run", str(path), "--out", str(tmp_path / "a"), "--backend", "ray", "--address", "auto"]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "b")]) == 0
    assert main(["run", str(path), "--out", str(tmp_path / "c"), "--backend", "ray"]) == 0
    assert seen == [None, None, "disabled"]


def test_ray_backend_matches_local(tmp_path, model_dir, text_file, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    import ray

    path = write_config(tmp_path, model_dir("llama"), text_file, methods='["llm.int8"]', thresholds="[2, 6]")
    text = path.read_text().replace(
        f'models = ["{model_dir("llama")}"]', f'models = ["{model_dir("llama")}", "{model_dir("opt")}"]'
    )
    path.write_text(text)
    cfg = load_config(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run_study(cfg, tmp_path / "ray", progress=False, backend="ray")
    finally:
        ray.shutdown()
    assert counts == {"done": 6, "failed": 0, "skipped": 0, "stale": 0}
    run_study(cfg, tmp_path / "local", progress=False)
    a = Store(tmp_path / "ray").frame().set_index("key").ppl.sort_index()
    b = Store(tmp_path / "local").frame().set_index("key").ppl.sort_index()
    assert list(a.index) == list(b.index)
    assert (abs(a - b) / b < 1e-5).all()  # same numbers, computed in other processes


# ---------------------------------------------------------------- cell identity and reports for any grid


def _ppl(out, method="fp32", threshold=None):
    from studies.report import current_results

    _, df, _ = current_results(out)
    rows = df[(df.kind == "perplexity") & (df.method == method)]
    if threshold is not None:
        rows = rows[rows.threshold == threshold]
    return float(rows.ppl.iloc[-1])


def test_a_changed_corpus_is_recomputed_and_reported(tmp_path, model_dir, sample_text):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(sample_text[:20_000])
    cfg = load_config(write_config(tmp_path, model_dir("llama"), corpus, methods='["llm.int8"]', thresholds="[6]"))
    out = tmp_path / "out"
    run_study(cfg, out, progress=False)
    before = _ppl(out)
    corpus.write_text(sample_text[20_000:40_000])  # same file name, other text
    assert set(status(out).state) == {"stale"}
    assert "0 cells current" in write_report(out).read_text()  # nothing stale is reported
    assert "left out" in (out / "report.md").read_text()
    counts = run_study(cfg, out, progress=False)
    assert counts == {"done": 2, "failed": 0, "skipped": 0, "stale": 2}
    after = _ppl(out)
    assert after != before
    assert f"{after:.3f}" in write_report(out).read_text()


def test_changed_weights_in_a_model_folder_are_recomputed(tmp_path, text_file, tokenizer):
    from helpers import make_model

    folder = tmp_path / "model"
    make_model("gpt2", seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = load_config(write_config(tmp_path, folder, text_file, methods='["absmax-vector"]', thresholds="[6]"))
    out = tmp_path / "out"
    run_study(cfg, out, progress=False)
    before = _ppl(out)
    make_model("gpt2", seed=1).save_pretrained(folder)  # the same folder, other weights
    assert run_study(cfg, out, progress=False)["stale"] == 2
    assert _ppl(out) != before
    assert f"{_ppl(out):.3f}" in write_report(out).read_text()


def test_thresholds_3_only_gets_llm_int8_in_every_table(tmp_path, model_dir, text_file):
    cfg = load_config(
        write_config(
            tmp_path,
            model_dir("llama"),
            text_file,
            methods='["llm.int8"]',
            thresholds="[3]",
            measure='["perplexity", "outliers"]',
        )
    )
    out = tmp_path / "out"
    run_study(cfg, out, progress=False)
    text = write_report(out).read_text()
    assert "### Decomposition threshold 3" in text
    assert "absmax LLM.int8()" in (out / "table1_t3.md").read_text()
    assert "absmax LLM.int8()" in (out / "agreement.md").read_text()
    assert "llm.int8 ppl (t=3)" in (out / "table4.md").read_text()
    t4 = (out / "table4.csv").read_text().splitlines()
    assert len(t4) == 2 and ",," not in t4[1].split("llm.int8")[0]  # the t=3 perplexity is filled


def test_report_section_and_missing_layouts_are_named(tmp_path, model_dir, text_file):
    path = write_config(tmp_path, model_dir("llama"), text_file, methods='["llm.int8"]', thresholds="[2, 6]")
    path.write_text(path.read_text() + "\n[report]\nthresholds = [6]\n")
    cfg = load_config(path)
    assert cfg.report_thresholds == (6.0,)
    out = tmp_path / "out"
    run_study(cfg, out, progress=False)
    text = write_report(out).read_text()
    assert "### Decomposition threshold 6" in text and "### Decomposition threshold 2" not in text
    assert "no Table-4 layout" in text
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace("thresholds = [6]", "thresholds = [5]"))
    with pytest.raises(InvalidArgumentError, match=r"\[report\] thresholds \[5.0\] are not in"):
        load_config(bad)


def test_study_json_is_validated_when_read_back(tmp_path, model_dir, text_file):
    import json

    cfg = load_config(write_config(tmp_path, model_dir("llama"), text_file, methods='["absmax"]'))
    out = tmp_path / "out"
    run_study(cfg, out, progress=False)
    data = json.loads((out / "study.json").read_text())
    data["study"]["methods"] = ["int4"]
    (out / "study.json").write_text(json.dumps(data))
    with pytest.raises(InvalidArgumentError, match="unknown method 'int4'"):
        write_report(out)


def test_cells_of_another_commit_are_kept_and_redone_on_request(tmp_path, model_dir, text_file, monkeypatch):
    from studies import planning

    cfg = load_config(write_config(tmp_path, model_dir("llama"), text_file, methods='["absmax"]'))
    out = tmp_path / "out"
    monkeypatch.setattr(planning, "git_commit", lambda: ("a" * 40, False))
    run_study(cfg, out, progress=False)
    monkeypatch.setattr(planning, "git_commit", lambda: ("b" * 40, False))
    assert set(status(out).state) == {"older"}
    assert run_study(cfg, out, progress=False)["skipped"] == 2
    assert run_study(cfg, out, progress=False, recompute_older=True)["done"] == 2
    assert set(status(out).state) == {"done"}


def test_markdown_tables_escape_pipes_inside_cells():
    import pandas as pd

    from studies.format import markdown

    md = markdown(pd.DataFrame({"criterion": ["|x| >= 6"], "dims": [1.5]}), ".1f")
    assert md.splitlines() == ["| criterion | dims |", "|---|---|", "| \\|x\\| >= 6 | 1.5 |"]


def test_two_models_get_the_phenomena_beside_the_emergence(tmp_path, model_dir, text_file):
    path = write_config(
        tmp_path,
        model_dir("llama"),
        text_file,
        methods='["llm.int8"]',
        thresholds="[6]",
        measure='["outliers", "sinks"]',
    )
    path.write_text(path.read_text().replace("models = [", f'models = ["{model_dir("gpt2")}", '))
    out = tmp_path / "out"
    assert run_study(load_config(path), out, progress=False)["failed"] == 0
    text = write_report(out).read_text()
    assert "## Beside the emergence" in text and (out / "phenomena.png").exists()
    import pandas as pd

    phen = pd.read_csv(out / "phenomena.csv")
    assert len(phen) == 2 and phen["sink rate"].between(0, 1).all() and (phen["max ∞-norm"] > 0).all()


# ---------------------------------------------------------------- transforms before quantizing (alphas, rotations)


@pytest.mark.parametrize(
    "lines, message",
    [
        ("alphas = [1.5]", "alphas (smoothing strengths) must be in [0, 1], got [1.5]"),
        ('alphas = ["half"]', "alphas must be a list of int or float"),
        ('rotations = ["givens"]', "unknown rotation(s) ['givens'] in rotations; choose from hadamard"),
        ('alphas = [0.5]\nmeasure = ["outliers"]', "alphas apply to the perplexity measure, which `measure` lacks"),
        ("alphas = [0.5, 0.5]", "alphas lists [0.5] more than once"),
        ('rotations = ["hadamard"]\nmethods = []', "rotations transform methods' inputs, but `methods` is empty"),
    ],
    ids=["alpha-range", "alpha-type", "rotation", "no-perplexity", "twice", "no-method"],
)
def test_bad_transform_settings_name_the_key(tmp_path, lines, message):
    path = tmp_path / "bad.toml"
    path.write_text(f'[study]\nname = "x"\nmodels = ["m"]\n{lines}\n')
    with pytest.raises(InvalidArgumentError, match=str(path)) as e:
        load_config(path)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "protocol, bos", [("chunks", "corpus"), ("sliding", "corpus"), ("chunks", "window")], ids=lambda v: v
)
def test_calibration_starts_after_the_last_token_evaluation_reads(protocol, bos):
    import torch
    from helpers import make_model

    from outliers.eval.rows import RowEvaluator
    from outliers.eval.windows import PerplexitySettings
    from studies.config import parse_config
    from studies.measures.perplexity import evaluated_tokens

    study = {"name": "x", "models": ["m"], "protocol": protocol, "bos": bos, "window": 32, "max_windows": 3}
    cfg = parse_config({"study": study})
    ids = torch.cat([torch.tensor([0]), torch.arange(1, 1000)])  # token 0 stands for a BOS at the corpus start
    settings = PerplexitySettings(protocol, 32, None, 3, 4, bos)
    reserved = evaluated_tokens(ids, cfg, 0)
    # 3 windows of 32 (of 31 corpus tokens after a BOS of each window's own, the corpus' first dropped), or
    # windows starting every 16 tokens
    assert reserved == {"chunks-corpus": 96, "sliding-corpus": 64, "chunks-window": 1 + 3 * 31}[f"{protocol}-{bos}"]
    # one rule: the row evaluator (outliers eval, the study's cells) reserves exactly these tokens
    assert RowEvaluator(make_model("llama"), ids, settings, bos_token_id=0).reserved == reserved


def _planted_llama(folder, tokenizer, hidden=128, gain=6.0):
    """A tiny llama whose pre-attention and pre-FFN norms scale dims 3 and 17 by ``gain``.

    Normalized values are about N(0, 1): scaled by 6 the two dims reach |x| >= 6 in any batch, no other dim
    does; a Hadamard rotation spreads them over 128 dims (rms about 1.4), so nothing reaches 6 any more.
    (At 32 dims, or with helpers.planted_model's gain 40, the rotated spread reaches 6 in most columns.)
    """
    import torch
    from helpers import PLANTED, make_model

    from outliers.arch.registry import architecture_of, blocks

    model = make_model("llama", hidden=hidden)
    family = architecture_of(model)
    with torch.no_grad():
        for _, _, block in blocks(model, family):
            for shared in (family.attn_in, family.ffn_in):
                block.get_submodule(shared.norm).weight[list(PLANTED)] = gain
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_transforms_cross_methods_and_thresholds(tmp_path, text_file, tokenizer, monkeypatch):
    import outliers.quant.calibration as calibration
    from outliers.quant.transforms import Transform
    from studies.measures import MEASURES
    from studies.planning import plan

    model = _planted_llama(tmp_path / "model", tokenizer)
    plain = load_config(write_config(tmp_path, model, text_file, thresholds="[0, 6]"))  # llm.int8 and absmax
    path = tmp_path / "transformed.toml"
    path.write_text((tmp_path / "study.toml").read_text() + 'alphas = [0.5]\nrotations = ["hadamard"]\n')
    cfg = load_config(path)
    made = []
    make = calibration.transformed_copy
    monkeypatch.setattr(calibration, "transformed_copy", lambda *a, **kw: made.append(a[1]) or make(*a, **kw))
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False) == {"done": 1 + 3 * 3, "failed": 0, "skipped": 0, "stale": 0}
    assert made == [Transform(smooth=0.5), Transform(rotate="hadamard")]  # once each, for its three cells
    assert run_study(cfg, out, progress=False) == {"done": 0, "failed": 0, "skipped": 10, "stale": 0}

    # identity: the study without alphas/rotations finds every one of its cells done here, keys and fingerprints
    store = Store(out)
    assert {p.state for p in plan(plain, store)} == {"done"}
    rows = store.frame()
    ours = {p.key for p in plan(plain, store)}
    transformed = rows[rows.method.str.contains("@")]
    assert len(transformed) == 6 and not set(transformed.key) & ours
    settings = {
        r.method: MEASURES["perplexity"].settings_of({"method": r.method}, cfg) for r in transformed.itertuples()
    }
    assert settings["llm.int8@smooth=0.5"]["transform"] == {"smooth": 0.5, "rotate": None, "calib_windows": 16}
    assert "calibration" in settings["llm.int8@smooth=0.5"] and "calibration" not in settings["absmax@hadamard"]
    assert settings["absmax@hadamard"]["transform"] == {"smooth": None, "rotate": "hadamard", "seed": 0}
    assert transformed.fingerprint.nunique() == 6 and not set(transformed.fingerprint) & set(
        rows.fingerprint[~rows.method.str.contains("@")]
    )
    extra = {r.method: r.result["extra"] for r in transformed.itertuples()}
    assert extra["llm.int8@smooth=0.5"]["calib_tokens"] == 16 * 32 and extra["absmax@hadamard"]["hadamard"]

    # the share of columns through float: the planted dims at q/k/v and gate/up (5 of each block's 7 linears)
    share = {(r.method, r.threshold): r.result.get("float_columns_pct") for r in rows.itertuples()}
    assert share[("llm.int8", 6.0)] == pytest.approx(100 * 2 / 128 * 5 / 7)
    assert share[("llm.int8@hadamard", 6.0)] < share[("llm.int8", 6.0)]
    assert share[("llm.int8", 0.0)] == 0 and share[("absmax", 0.0)] is None  # no decomposition: none recorded

    text = write_report(out).read_text()
    assert "## Smoothing and rotation vs decomposition" in text and (out / "transform_curves.png").exists()
    delta = (out / "transforms_delta.md").read_text().splitlines()
    assert delta[0].endswith("| threshold | no transform | after smooth 0.5 | after hadamard |")
    assert len(delta) == 2 + 3 and all(line.count(" %") == 3 for line in delta[2:])  # llm.int8 x 2, absmax
    assert len((out / "transforms_float_columns.md").read_text().splitlines()) == 2 + 2  # llm.int8 only
    assert "LLM.int8() (vector-wise + decomposition) after hadamard" in (out / "agreement.md").read_text()
    assert "after" not in (out / "table1_t6.md").read_text()  # the Table-1 layout keeps the untransformed rows


def test_rows_named_with_their_transform_are_in_the_table1_layout(tmp_path, model_dir, text_file):
    path = write_config(
        tmp_path,
        model_dir("llama"),
        text_file,
        methods='["llm.int8", "absmax-vector@smooth=0.5", "llm.int8@hadamard"]',
        thresholds="[6]",
        max_windows="1",
    )
    cfg = load_config(path)
    assert [c["method"] for c in cells(cfg)] == ["fp32", "llm.int8", "absmax-vector@smooth=0.5", "llm.int8@hadamard"]
    out = tmp_path / "out"
    assert run_study(cfg, out, progress=False)["failed"] == 0
    write_report(out)
    table = (out / "table1_t6.md").read_text()
    assert "absmax vector-wise after smooth 0.5" in table and "after hadamard" in table
    bad = tmp_path / "bad.toml"
    bad.write_text(path.read_text().replace("llm.int8@hadamard", "llm.int8@givens"))
    with pytest.raises(InvalidArgumentError, match="unknown or repeated step 'givens'"):
        load_config(bad)


def test_a_row_named_twice_is_one_cell(tmp_path, model_dir, text_file):
    path = write_config(
        tmp_path,
        model_dir("llama"),
        text_file,
        methods='["llm.int8", "llm.int8@smooth=0.50"]',
        thresholds="[6]",
        alphas="[0.5]",
    )
    names = [c["method"] for c in cells(load_config(path))]
    assert names == ["fp32", "llm.int8", "llm.int8@smooth=0.5"]


def test_a_sweep_s_cells_equal_the_same_cells_run_alone(tmp_path, model_dir, text_file):
    """Cells of one sweep share one quantized copy, re-thresholded: each equals its cell quantized alone."""
    from studies.report import current_results

    def results(thresholds, out):
        cfg = write_config(tmp_path, model_dir("llama"), text_file, methods='["llm.int8"]', thresholds=thresholds)
        run_study(load_config(cfg), tmp_path / out, progress=False)
        df = current_results(tmp_path / out)[1]
        rows = df[(df.kind == "perplexity") & (df.method == "llm.int8")]
        cols = zip(rows.threshold, rows.ppl, rows.result.map(lambda r: r["float_columns_pct"]), strict=True)
        return {float(t): (float(p), float(c)) for t, p, c in cols}

    swept = results("[6, 0, 2]", "swept")
    for t in (2.0, 0.0):
        assert results(f"[{t:g}]", f"alone{t:g}")[t] == swept[t]  # perplexity and float columns, exactly
    assert swept[2.0][1] > swept[6.0][1] >= swept[0.0][1] == 0.0
