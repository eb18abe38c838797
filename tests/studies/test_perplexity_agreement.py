"""The perplexity measure stores KLD's percentiles and Δp beside KL and top-1, and its report shows KLD p99 and
Δp RMS where those appear; cells stored before them report blanks, and no cell's key or fingerprint changes."""

import pandas as pd

from studies.config import load_config
from studies.measures.perplexity_report import agreement_table, ppl_rows
from studies.report import write_report
from studies.runner import run_study
from studies.store import Store


def test_perplexity_cells_store_llama_cpp_s_agreement_and_the_report_shows_it(tmp_path, model_dir, text_file):
    lines = ["[study]", 'name = "tiny"', f'models = ["{model_dir("llama")}"]', f'corpora = ["{text_file}"]']
    lines += ['methods = ["llm.int8"]', "thresholds = [1]", "window = 32", "max_windows = 3", "batch_size = 2"]
    (tmp_path / "study.toml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert run_study(load_config(tmp_path / "study.toml"), out, progress=False)["done"] == 2
    rows = Store(out).frame()
    q = rows[rows.method == "llm.int8"].iloc[0].result
    assert set(q["kld_percentiles"]) == {"50", "90", "95", "99", "99.9", "max"} and q["delta_p_rms"] > 0
    assert q["kld_percentiles_ci95"]["99"] and q["delta_p_mean_ci95"] and "token_ref_nll" not in q
    assert rows[rows.method == "fp32"].iloc[0].result["kld_percentiles"] is None
    write_report(out)
    agreement = (out / "agreement.md").read_text()
    assert "KLD p99" in agreement and "Δp RMS %" in agreement
    assert f"{100 * q['delta_p_rms']:.3f} [" in agreement
    flat = pd.read_csv(out / "perplexity.csv")
    assert {"kld_p99", "delta_p_rms"} <= set(flat.columns)


def test_perplexity_cells_stored_before_kld_and_delta_p_report_blanks():
    old = {"kl_vs_ref": 0.01, "kl_vs_ref_ci95": [0.009, 0.011], "top1_agreement": 0.9, "top1_agreement_ci95": None}
    df = pd.DataFrame(
        [dict(kind="perplexity", status="done", model="m", corpus="c", method="llm.int8", threshold=6.0, result=old)]
    )
    rows = ppl_rows(df)
    assert rows.kld_p99.iloc[0] is None and rows.delta_p_rms.iloc[0] is None
    table = agreement_table(rows)
    assert table["KLD p99"].iloc[0] == "" and table["Δp RMS %"].iloc[0] == ""
    assert table["KL nats/token"].iloc[0] == "0.0100 [0.0090, 0.0110]"
