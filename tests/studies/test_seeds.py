"""A study crosses rotations with random-sign ``seeds``; without them every cell keeps its key and fingerprint."""

import pytest

from outliers import InvalidArgumentError
from studies.config import load_config, parse_config
from studies.planning import _settings, cell_key
from studies.report import write_report
from studies.runner import cells, run_study

STUDY = {"name": "x", "models": ["m"], "methods": ["absmax", "llm.int8"], "thresholds": [6], "window": 32}


def test_seeds_cross_rotations_and_leave_seed_0_as_it_was():
    plain = parse_config({"study": STUDY | {"rotations": ["hadamard"]}})
    seeded = parse_config({"study": STUDY | {"rotations": ["hadamard"], "seeds": [0, 1, 2]}})
    assert plain.seeds is None and seeded.seeds == (0, 1, 2)
    names = [c["method"] for c in cells(seeded)]
    assert names == [
        "fp32",
        "absmax",
        "llm.int8",
        "absmax@hadamard",
        "llm.int8@hadamard",
        "absmax@hadamard+seed=1",
        "llm.int8@hadamard+seed=1",
        "absmax@hadamard+seed=2",
        "llm.int8@hadamard+seed=2",
    ]
    before = {cell_key(c): _settings(c, plain) for c in cells(plain)}
    after = {cell_key(c): _settings(c, seeded) for c in cells(seeded)}
    assert before.items() <= after.items()  # the same places and settings: found done by the seeded study
    extra = [s["transform"] for k, s in after.items() if k not in before]
    assert sorted(t["seed"] for t in extra) == [1, 1, 2, 2] and all(t["rotate"] == "hadamard" for t in extra)
    only = parse_config({"study": STUDY | {"rotations": ["hadamard"], "seeds": [0]}})
    assert [c["method"] for c in cells(only)] == [c["method"] for c in cells(plain)]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"seeds": [1, 2]}, "seeds are the rotations' random signs: give rotations"),
        ({"rotations": ["hadamard"], "seeds": []}, "give rotations, and at least one seed"),
        ({"rotations": ["hadamard"], "seeds": [1, 1]}, "seeds lists [1] more than once"),
        ({"rotations": ["hadamard"], "seeds": [0.5]}, "seeds must be a list of int"),
    ],
    ids=["no-rotation", "empty", "twice", "type"],
)
def test_bad_seeds_are_refused(extra, message):
    with pytest.raises(InvalidArgumentError) as e:
        parse_config({"study": STUDY | extra})
    assert message in str(e.value)


def test_a_seeded_study_runs_and_reports_the_spread(tmp_path, model_dir, text_file):
    path = tmp_path / "study.toml"
    path.write_text(
        f'[study]\nname = "seeds"\nmodels = ["{model_dir("llama")}"]\ncorpora = ["{text_file}"]\n'
        'methods = ["absmax"]\nrotations = ["hadamard"]\nseeds = [0, 1, 2]\n'
        "window = 32\nmax_windows = 2\nbatch_size = 2\n"
    )
    out = tmp_path / "out"
    assert run_study(load_config(path), out, progress=False) == {"done": 5, "failed": 0, "skipped": 0, "stale": 0}
    text = write_report(out).read_text()
    assert "### Spread over rotation seeds" in text and "randomized Hadamard rotation (seeds 0, 1, 2)" in text
    spread = (out / "transforms_seeds.md").read_text().splitlines()
    assert len(spread) == 3 and "| 3 |" in spread[2] and "KL mean 95% t" in spread[0]
    delta = (out / "transforms_delta.md").read_text().splitlines()[0]
    assert delta.endswith("| no transform | after hadamard | after hadamard seed 1 | after hadamard seed 2 |")


def test_the_formats_and_rotation_seeds_configs_parse():
    grid = [c["method"] for c in cells(load_config("studies/configs/formats.toml"))]
    assert len(grid) == 1 + 7 * 2 and "mxfp4@hadamard" in grid and "nvfp4-w@hadamard" in grid
    grid = [c["method"] for c in cells(load_config("studies/configs/rotation_seeds.toml"))]
    assert len(grid) == 1 + 3 * 11 and "mxfp4@hadamard+seed=9" in grid and "llm.int8@hadamard" in grid
