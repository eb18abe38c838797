"""``--method formats`` (the microscaling rows), ``--method all`` as it was, and a rotation's seed in a row name."""

import pytest

from outliers import InvalidArgumentError
from outliers.eval.rows import FORMAT_ROWS, parse_rows, row_label
from outliers.quant.transform_spec import Transform, parse_row, row_name

# what ``--method all`` listed before the microscaling methods were registered (they are not in it)
ALL_BEFORE = [
    "fp32",
    "absmax",
    "zeropoint",
    "absmax-row",
    "absmax-vector",
    "zeropoint-vector",
    "absmax-row+decomp",
    "llm.int8",
    "zeropoint-llm.int8",
    "fp8-tensor",
    "fp8-token",
    "w4a16-g128",
    "absmax-vector",  # SmoothQuant
]


def test_all_is_unchanged_and_formats_are_the_microscaling_rows():
    rows = parse_rows("all")
    assert [r.method for r in rows] == ALL_BEFORE and rows[-1].transform.smooth == 0.5
    rows = parse_rows("formats")
    assert [r.method for r in rows] == ["fp32", "mxfp8", "mxint8", "mxfp6", "mxfp4", "nvfp4", "mxfp4-w", "nvfp4-w"]
    assert tuple(r.method for r in rows[1:]) == FORMAT_ROWS and not any(r.transform for r in rows)
    assert row_label(rows[4]) == "MXFP4 W4A4 (emulated)"
    rotated = parse_rows("formats", Transform(rotate="hadamard", seed=2))
    assert not rotated[0].transform and all(r.transform == Transform(rotate="hadamard", seed=2) for r in rotated[1:])
    assert row_label(rotated[4]) == "MXFP4 W4A4 (emulated) after hadamard"


def test_a_format_takes_a_transform_in_its_name():
    (row,) = parse_rows("mxfp4@hadamard")
    assert (row.method, row.transform) == ("mxfp4", Transform(rotate="hadamard"))
    rows = parse_rows("mxfp4@smooth=0.5,nvfp4-w@hadamard+seed=3")
    assert [r.method for r in rows] == ["fp32", "mxfp4", "nvfp4-w"] and rows[2].transform.seed == 3


def test_a_rotation_s_seed_in_a_row_name():
    method, t = parse_row("llm.int8@hadamard+seed=7")
    assert (method, t.rotate, t.seed) == ("llm.int8", "hadamard", 7)
    assert row_name(method, t, seed=True) == "llm.int8@hadamard+seed=7"
    assert row_name(method, t) == "llm.int8@hadamard"  # a setting, unless asked for
    assert row_name(method, Transform(rotate="hadamard"), seed=True) == "llm.int8@hadamard"  # seed 0: as always
    assert parse_row("x@seed=2+smooth=0.5+hadamard", seed=1)[1] == Transform(0.5, "hadamard", seed=2)
    assert parse_row("x@hadamard", seed=4)[1].seed == 4  # the fill-in where the name has none
    with pytest.raises(InvalidArgumentError, match="seed=N is the rotation's"):
        parse_row("x@smooth=0.5+seed=2")
    with pytest.raises(InvalidArgumentError, match="seed='a' is not an integer"):
        parse_row("x@hadamard+seed=a")
    with pytest.raises(InvalidArgumentError, match="unknown or repeated step 'seed=3'"):
        parse_row("x@hadamard+seed=2+seed=3")
