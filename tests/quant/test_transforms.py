"""Smoothing and Hadamard rotation: the float model unchanged, the outlier moved, composable with quantization."""

import pytest
import torch
from helpers import PLANTED, make_model, planted_model

from outliers import CorpusError, InvalidArgumentError
from outliers.analysis.hooks import capture
from outliers.analysis.stats import Stat
from outliers.arch.linear import weight_of
from outliers.quant.calibration import activation_max, calibration_windows, transformed_copy
from outliers.quant.model import quantize_model
from outliers.quant.transforms import (
    ChannelScale,
    Rotation,
    Shared,
    Transform,
    TransformedInput,
    input_groups,
    smoothing_scales,
)

CORPUS = torch.randint(0, 384, (2000,), generator=torch.Generator().manual_seed(0))
BATCH = CORPUS[:96].view(3, 32)
TRANSFORMS = [Transform(rotate="hadamard"), Transform(smooth=0.5), Transform(smooth=0.8, rotate="hadamard")]


def logits(model, ids=BATCH):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gemma"])
@pytest.mark.parametrize("transform", TRANSFORMS, ids=lambda t: t.label)
def test_the_float_model_is_unchanged_to_float32_rounding(arch, transform):
    model = planted_model(arch) if arch != "gemma" else make_model(arch)
    out, info = transformed_copy(model, transform, CORPUS, window=32, reserved=BATCH.numel())
    a, b = logits(model), logits(out)
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5 * a.abs().max().item())
    ppl = lambda x: torch.nn.functional.cross_entropy(x[:, :-1].flatten(0, 1), BATCH[:, 1:].flatten())  # noqa: E731
    assert ppl(b).item() == pytest.approx(ppl(a).item(), rel=1e-5)
    assert info["transform"] == transform.label and logits(model).equal(a)  # the original is untouched
    assert out.get_input_embeddings().weight is model.get_input_embeddings().weight  # shared, not copied


def test_smoothing_moves_a_planted_outlier_channel_into_the_weights():
    model = planted_model("llama")  # attn_in and ffn_in dims 3 and 17 are 40x the others
    smoothed, info = transformed_copy(model, Transform(smooth=0.5), CORPUS, window=32, reserved=96)
    assert info["smoothed_into_norm"] == 4 and info["smoothed_by_module"] == 4  # q/k/v, up/gate; o_proj, down

    def input_range(m):
        with torch.inference_mode(), capture(m, "attn_in") as st:
            m(input_ids=BATCH)
        amax = st.get("L00.attn_in", Stat.ABSMAX)
        others = [d for d in range(len(amax)) if d not in PLANTED]
        return amax[list(PLANTED)].min() / amax[others].median()

    # what the quantizer sees: alpha 0.5 leaves about the square root of the outlier's range (the weights are
    # about even across columns), the rest went into the weights; alpha 1 would move all of it
    before, after = input_range(model), input_range(smoothed)
    assert before > 20 and before**0.5 / 1.5 < after < 1.5 * before**0.5
    q0, q1 = weight_of(model.model.layers[0].self_attn.q_proj), weight_of(smoothed.model.layers[0].self_attn.q_proj)
    ratio = q1.abs().amax(0) / q0.abs().amax(0)  # column j scaled by s_j
    assert ratio[list(PLANTED)].min() > 3 * ratio[[d for d in range(32) if d not in PLANTED]].max()


def test_smoothing_scales_follow_the_formula():
    model = make_model("opt")
    act = activation_max(model, calibration_windows(CORPUS, 32, 4))
    g = input_groups(model)[0]
    w = torch.stack([weight_of(model.get_submodule(n)).abs().amax(0) for n in g.linears]).amax(0)
    s = smoothing_scales(model, act, 0.75)[g.name]
    torch.testing.assert_close(s, act[g.name].clamp_min(1e-5) ** 0.75 / w.clamp_min(1e-5) ** 0.25)
    assert g.linears == tuple(f"model.decoder.layers.0.self_attn.{p}_proj" for p in "qkv")


def test_calibration_never_overlaps_evaluation():
    w = calibration_windows(CORPUS, 32, 4, reserved=1000)
    assert torch.equal(w.flatten(), CORPUS[-128:])
    with pytest.raises(CorpusError, match="after the 1900 tokens evaluation uses, but the corpus has 2000"):
        calibration_windows(CORPUS, 32, 4, reserved=1900)


def test_linears_of_one_input_share_one_rotation_that_computes_once():
    model, _ = transformed_copy(make_model("llama"), Transform(rotate="hadamard"), window=32)
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.op
    assert isinstance(shared, Shared) and shared is attn.k_proj.op is attn.v_proj.op and shared.readers == 3
    assert isinstance(shared.op, Rotation)
    calls = []
    original = Rotation.forward
    Rotation.forward = lambda self, x: calls.append(self) or original(self, x)  # type: ignore[method-assign]
    try:
        logits(model)
    finally:
        Rotation.forward = original  # type: ignore[method-assign]
    assert calls.count(shared.op) == 1 and shared._memo is None  # no activation kept after its readers


def test_a_scale_module_then_a_rotation_still_compute_once_per_input():
    """Families without a foldable norm (OLMo, BERT) get a ChannelScale before q/k/v; a rotation then composes
    with it into one shared op, not one per linear."""
    from outliers.quant.transforms import _place

    model = make_model("llama")
    qkv = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    _place(model, qkv, ChannelScale(torch.full((32,), 2.0)))
    _place(model, qkv, Rotation(32, seed=0))
    attn = model.model.layers[0].self_attn
    shared = attn.q_proj.op
    assert isinstance(shared, Shared) and shared is attn.k_proj.op is attn.v_proj.op
    assert [type(m) for m in shared.op] == [ChannelScale, Rotation]
    calls = []
    original = Rotation.forward
    Rotation.forward = lambda self, x: calls.append(self) or original(self, x)  # type: ignore[method-assign]
    try:
        logits(model)
    finally:
        Rotation.forward = original  # type: ignore[method-assign]
    assert len(calls) == 1  # layer 0's q/k/v input, once


def test_half_precision_inputs_are_rotated_without_bias():
    rot = Rotation(576, seed=0)
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(0)).bfloat16()
    exact = (x.double() @ _dense(rot)).float()
    got = rot(x).float()
    assert got.dtype == torch.float32 and rot(x).dtype == torch.bfloat16
    ratio = (got.norm(dim=1) / exact.norm(dim=1)).mean().item()
    assert abs(ratio - 1) < 1e-3  # a bf16 copy of 1/24 alone would scale every output by 1.00195


def _dense(rot: Rotation) -> torch.Tensor:
    return torch.kron(rot.h_a.double(), rot.h_b.double()) * rot.signs.double()


def test_transforms_compose_with_quantization_and_capture_sees_the_quantizer_input():
    model = planted_model("gpt2")
    out, _ = transformed_copy(model, Transform(smooth=0.5, rotate="hadamard"), CORPUS, window=32, reserved=96)
    assert isinstance(out.transformer.h[0].attn.c_proj, TransformedInput)
    assert isinstance(out.transformer.h[0].attn.c_proj.op[0], ChannelScale)
    report = quantize_model(out, "llm.int8")
    assert len(report.replaced) == 8 and all(n.endswith(".linear") for n in report.replaced)
    with torch.inference_mode(), capture(out, "attn,ffn") as st:
        out(input_ids=BATCH)
    assert all(p.module.endswith(".linear") for p in st.points)
    assert max(float(st.get(p.name, Stat.ABSMAX).max()) for p in st.points) < 6  # nothing left to decompose
    assert torch.isfinite(logits(out)).all()


def test_bad_transforms_are_refused():
    with pytest.raises(InvalidArgumentError, match="alpha must be in"):
        Transform(smooth=1.5)
    with pytest.raises(InvalidArgumentError, match="unknown rotation 'givens'"):
        Transform(rotate="givens")
    with pytest.raises(CorpusError, match="smoothing needs calibration text"):
        transformed_copy(make_model("llama"), Transform(smooth=0.5))
    assert not Transform() and Transform(smooth=0.5, rotate="hadamard").label == "smooth 0.5 + hadamard"


def test_scan_after_a_transform_says_so_and_records_it(model_dir, text_file, tmp_path, capsys):
    from outliers.analysis.stats import OutlierStats
    from outliers.cli import main

    argv = ["scan", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    argv += ["--max-tokens", "64", "--calib-windows", "2", "--smooth", "0.5", "--rotate", "hadamard"]
    assert main([*argv, "--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert "after smoothing (alpha 0.5, 64 calibration tokens" in printed and "and hadamard rotation (seed 0" in printed
    meta = OutlierStats.load(tmp_path / "s").meta
    assert meta["smooth"] == 0.5 and meta["rotate"] == "hadamard" and meta["calib_tokens"] == 64
    assert main([*argv[:-4], "--smooth", "2"]) == 2
    assert "alpha must be in [0, 1], got 2.0" in capsys.readouterr().err


def test_eval_after_a_rotation_scores_against_the_untransformed_float_model(model_dir, text_file, tmp_path, capsys):
    import json

    from outliers.cli import main

    argv = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    argv += ["--max-windows", "2", "--rotate", "hadamard", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--method", "fp32"]) == 0
    rotated_float = json.loads((tmp_path / "r.json").read_text())
    assert rotated_float["ppl"] == pytest.approx(rotated_float["ref_ppl"], rel=1e-5)  # a rotation changes nothing
    assert rotated_float["kl_vs_ref"] < 1e-9 and rotated_float["extra"]["hadamard"] == [
        "sylvester(32)",
        "sylvester(64)",
    ]
    assert main([*argv, "--method", "llm.int8"]) == 0
    assert "llm.int8 after hadamard (threshold 6.0)" in capsys.readouterr().out


def test_eval_takes_a_list_of_methods_from_its_baseline(model_dir, text_file, tmp_path, capsys):
    import json

    from outliers.cli import main

    argv = ["eval", "--model", str(model_dir("opt")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    argv += ["--max-windows", "2", "--calib-windows", "2", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--method", "absmax,smoothquant,w4a16-g128"]) == 0
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["method"] for r in records] == ["fp32", "absmax", "absmax-vector", "w4a16-g128"]
    assert records[2]["extra"]["smooth"] == 0.5 and "| SmoothQuant" in capsys.readouterr().out
    assert main([*argv, "--method", "absmax,nonsense"]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err


# ---------------------------------------------------------------- row names, and the columns LLM.int8() sends to float


ROWS = [
    (Transform(), "llm.int8"),
    (Transform(smooth=0.5), "llm.int8@smooth=0.5"),
    (Transform(rotate="hadamard"), "llm.int8@hadamard"),
    (Transform(smooth=1.0, rotate="hadamard"), "llm.int8@smooth=1+hadamard"),
    (Transform(smooth=0.1234567), "llm.int8@smooth=0.1234567"),  # never rounded into another alpha's name
]


@pytest.mark.parametrize("transform, name", ROWS, ids=[name for _, name in ROWS])
def test_row_names_round_trip(transform, name):
    from outliers.quant.transforms import parse_row, row_name

    assert row_name("llm.int8", transform) == name
    assert parse_row(name) == ("llm.int8", transform)
    assert parse_row("absmax-row+decomp@smooth=0.5") == ("absmax-row+decomp", Transform(smooth=0.5))  # '+' in a name
    method, t = parse_row("fp32@hadamard+smooth=0.50", seed=3, calib_windows=2)  # any order and spelling in
    assert row_name(method, t) == "fp32@smooth=0.5+hadamard" and (t.seed, t.calib_windows) == (3, 2)


@pytest.mark.parametrize(
    "name, message",
    [
        ("llm.int8@", "expected METHOD or METHOD@TRANSFORM"),
        ("@hadamard", "expected METHOD or METHOD@TRANSFORM"),
        ("llm.int8@givens", "unknown or repeated step 'givens'"),
        ("llm.int8@hadamard+hadamard", "unknown or repeated step 'hadamard'"),
        ("llm.int8@smooth=x", "smooth='x' is not a number"),
        ("llm.int8@smooth=2", "alpha must be in [0, 1], got 2.0"),
    ],
    ids=["no-transform", "no-method", "unknown", "twice", "not-a-number", "alpha"],
)
def test_bad_row_names_are_refused(name, message):
    from outliers.quant.transforms import parse_row

    with pytest.raises(InvalidArgumentError) as e:
        parse_row(name)
    assert message in str(e.value)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_float_columns_are_the_planted_dims_at_the_planted_points(arch):
    from outliers.arch.registry import architecture_of
    from outliers.quant.decomposed import float_columns
    from outliers.quant.model import quantized_copy

    model = planted_model(arch)  # dims 3 and 17 reach 6 in the inputs of q/k/v and the FFN expansion; no other does
    quantized, _ = quantized_copy(model, "llm.int8", 6.0)
    with torch.inference_mode(), float_columns(quantized) as seen:
        quantized(input_ids=BATCH)
    family = architecture_of(model)
    planted_at = [p.split(".")[-1] for s in (family.attn_in, family.ffn_in) for p in s.linears]
    at_points = [n for n in seen.calls if n.split(".")[-1] in planted_at]
    assert len(at_points) == 2 * len(planted_at) and all(seen.calls[n] == 1 for n in seen.calls)
    assert all(seen.layer_share(n) == len(PLANTED) / 32 for n in at_points)
    assert seen.share == pytest.approx(sum(map(seen.layer_share, seen.calls)) / seen.n_calls)  # one call each
    assert not any(m._forward_hooks for m in quantized.modules())  # gone with the block


def test_float_columns_count_nothing_without_decomposition_and_leave_no_hook_after_an_error():
    from outliers.quant.decomposed import float_columns
    from outliers.quant.model import quantized_copy

    model = planted_model("llama")
    for method, threshold in (("llm.int8", 0.0), ("absmax-vector", 6.0)):
        quantized, _ = quantized_copy(model, method, threshold)
        with torch.inference_mode(), float_columns(quantized) as seen:
            quantized(input_ids=BATCH)
        assert seen.share == (0.0 if method == "llm.int8" else None)  # threshold 0: decomposing, sends none
    quantized, _ = quantized_copy(model, "llm.int8", 6.0)
    with pytest.raises(RuntimeError, match="stop"), float_columns(quantized):
        raise RuntimeError("stop")
    assert not any(m._forward_hooks for m in quantized.modules())
    from outliers.quant.decomposed import decomposing_layers

    assert all(m.count_float_columns is None for _, m in decomposing_layers(quantized))  # reporting taken back


@pytest.mark.parametrize("round_to", [None, "float16"])
def test_float_columns_are_what_an_independent_count_finds(round_to):
    """The layers report their own counts: a separate look at each input, as the layer rounds it, agrees."""
    from outliers.quant.decomposed import float_columns
    from outliers.quant.int8 import outlier_columns
    from outliers.quant.linear import ROUND_TO, Int8Linear
    from outliers.quant.model import quantized_copy

    quantized, _ = quantized_copy(planted_model("llama"), "llm.int8", 3.0, round_to=round_to)
    want: dict[str, int] = {}

    def recount(name, mod, args):
        x = args[0].reshape(-1, mod.in_features).float()
        x = x.to(ROUND_TO[round_to]).float() if round_to else x
        want[name] = want.get(name, 0) + len(outlier_columns(x, 3.0))

    layers = [(n, m) for n, m in quantized.named_modules() if isinstance(m, Int8Linear)]
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: recount(n, mod, args)) for n, m in layers]
    with torch.no_grad(), float_columns(quantized) as seen:
        quantized(input_ids=BATCH)
    for h in handles:
        h.remove()
    assert {n: round(seen.fractions[n] * m.in_features) for n, m in layers} == want
    assert sum(want.values()) > 0


def test_float_columns_look_through_a_transform_at_what_is_quantized():
    """Smoothing moves the planted dims' range into the weights: fewer columns reach the threshold."""
    from outliers.quant.decomposed import float_columns
    from outliers.quant.model import quantized_copy

    model = planted_model("llama")
    shares = []
    for transform in (Transform(), Transform(smooth=0.5)):
        source = transformed_copy(model, transform, CORPUS, window=32, reserved=96)[0] if transform else model
        quantized, _ = quantized_copy(source, "llm.int8", 6.0, round_to="float16")
        with torch.inference_mode(), float_columns(quantized) as seen:
            quantized(input_ids=BATCH)
        shares.append(seen.share)
    assert shares[0] > 0.05 and shares[1] < shares[0] / 2


def test_eval_takes_row_names_with_their_transform(model_dir, text_file, tmp_path, capsys):
    import json

    from outliers.cli import main

    argv = ["eval", "--model", str(model_dir("llama")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    argv += ["--max-windows", "2", "--calib-windows", "2", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--method", "llm.int8,llm.int8@hadamard,absmax-vector@smooth=0.5+hadamard"]) == 0
    records = json.loads((tmp_path / "r.json").read_text())
    assert [r["extra"].get("transform", "") for r in records] == ["", "", "hadamard", "smooth 0.5 + hadamard"]
    assert "| absmax LLM.int8() (vector-wise + decomposition) after hadamard" in capsys.readouterr().out
    assert main([*argv, "--method", "llm.int8@hadamard", "--rotate", "hadamard"]) == 2
    assert "in the row name (llm.int8@hadamard) or by flags, not both" in capsys.readouterr().err


def test_eval_checks_room_for_calibration_before_scoring(model_dir, text_file, tmp_path, capsys):
    import json

    from outliers.cli import main

    argv = ["eval", "--model", str(model_dir("opt")), "--corpus", str(text_file), "--window", "32", "--quiet"]
    assert main([*argv, "--method", "all", "--json", str(tmp_path / "all.json")]) == 0  # the whole corpus
    assert "note: no SmoothQuant row: calibration needs 16 windows" in capsys.readouterr().err
    assert all("smooth" not in r["extra"] for r in json.loads((tmp_path / "all.json").read_text()))
    assert main([*argv, "--method", "llm.int8", "--smooth", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "calibration needs 16 windows" in err and "--max-windows" in err
    assert main([*argv, "--method", "smoothquant", "--calib-corpus", str(text_file)]) == 2  # the same text
    assert "calibration needs" in capsys.readouterr().err


def test_the_rotation_seed_changes_what_a_symmetric_quantizer_sees():
    # signs first (QuaRot): diag(s)·H mixes differently per seed; H·diag(s) would only flip column signs,
    # which every symmetric quantizer (absmax per row or per tensor) undoes exactly
    model = make_model("llama")
    outs = []
    for seed in (0, 1):
        out, _ = transformed_copy(model, Transform(rotate="hadamard", seed=seed), CORPUS, window=32, reserved=96)
        quantize_model(out, "absmax-vector")
        outs.append(logits(out))
    assert not torch.equal(outs[0], outs[1])
    x = torch.randn(5, 32, dtype=torch.float64)
    a, b = Rotation(32, 0).double(), Rotation(32, 1).double()
    assert not torch.equal(a(x).abs().sort(-1).values, b(x).abs().sort(-1).values)  # not a sign flip apart
