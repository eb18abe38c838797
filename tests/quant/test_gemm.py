"""The exact int8 GEMM backends and the choice among them (``outliers.quant.gemm``)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outliers.errors import InvalidArgumentError
from outliers.quant import gemm as G
from outliers.quant.quantizers import int8_matmul

NAMES = list(G.BACKENDS)


def _exact_here(name: str) -> None:
    if not G.verify(name):  # e.g. _int_mm under ONEDNN_MAX_CPU_ISA=AVX2: never chosen, so not tested further
        pytest.skip(f"{name} is not exact on this machine; the choice never uses it (test_inexact_never_chosen)")


def _ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.long() @ b.long().t()  # slow, exact


def _operands(m: int, k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return a, b


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("code", [-128, 127, -127])
def test_extreme_codes_at_the_largest_k(name, code):
    # every product -128 * -128 = 2^14 over Qwen2.5-Coder-1.5B's MLP width: the largest sums there are
    _exact_here(name)
    k = 8960
    a = torch.full((3, k), code, dtype=torch.int8)
    b = torch.full((5, k), code, dtype=torch.int8)
    b[1] = -128 if code != -128 else 127  # the most negative sums as well
    b[2, ::2] = 127
    got = G.BACKENDS[name].fn(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), _ref(a, b))
    assert got[0, 0].item() == k * code * code


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "m, k, n",
    [
        (1, 1, 1),
        (1, 576, 1536),
        (3, 1023, 7),
        (16, 1024, 33),
        (17, 1025, 31),
        (5, 2049, 9),
        (64, 1536, 576),
        (4096, 96, 24),
        (2, 8960, 19),
        (257, 4097, 3),
    ],
)
def test_backend_is_exact_on_odd_and_real_shapes(name, m, k, n):
    _exact_here(name)
    a, b = _operands(m, k, n, seed=m + k + n)
    got = G.BACKENDS[name].fn(a, b)
    assert got.shape == (m, n) and got.dtype == torch.int32
    assert torch.equal(got.long(), _ref(a, b))


@pytest.mark.parametrize("name", NAMES)
@given(m=st.integers(1, 40), k=st.integers(1, 2100), n=st.integers(1, 30), seed=st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_backend_is_exact_property(name, m, k, n, seed):
    _exact_here(name)
    a, b = _operands(m, k, n, seed)
    assert torch.equal(G.BACKENDS[name].fn(a, b).long(), _ref(a, b))


def test_non_contiguous_operands():
    a, b = _operands(12, 300, 40, seed=3)
    for name in NAMES:
        if G.verify(name):
            assert torch.equal(G.BACKENDS[name].fn(a[:, ::2], b[::2, ::2]).long(), _ref(a[:, ::2], b[::2, ::2]))


def test_float32_path_keeps_no_float_weights_and_splits_a_huge_head(monkeypatch):
    # a head wider than one block is widened block by block; the result is still exact
    monkeypatch.setattr(G, "_FLOAT32_BLOCK", 1000)
    a, b = _operands(7, 1500, 50, seed=4)
    assert torch.equal(G.BACKENDS["float32"].fn(a, b).long(), _ref(a, b))


def test_pinned_backend_runs_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setenv(G.ENV, "float32")
    assert G.selected(1) == G.selected(4096) == "float32"
    with G.use("int16"):
        assert G.selected(4096) == "int16"
    assert G.selected() == "float32"
    monkeypatch.setenv(G.ENV, "fast-please")
    with pytest.raises(InvalidArgumentError, match="unknown int8 GEMM backend 'fast-please'; available: int_mm"):
        G.selected()


def test_every_backend_gives_the_same_quantized_layer(monkeypatch):
    # llm.int8 through int8_matmul: the backend never changes a number
    from outliers.quant.int8 import llm_int8_matmul

    torch.manual_seed(0)
    x, w = torch.randn(40, 96) * 2, torch.randint(-127, 128, (24, 96), dtype=torch.int8)
    scb, bias = torch.rand(24) + 0.5, torch.randn(24)
    outs = []
    for name in NAMES:
        if G.verify(name):
            with G.use(name):
                outs.append(llm_int8_matmul(x, w, scb, 6.0, bias)[0])
    assert len(outs) >= 2 and all(torch.equal(outs[0], o) for o in outs[1:])


def test_choice_is_measured_once_cached_and_healed(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(G.ENV, raising=False)
    monkeypatch.setenv("OUTLIERS_CACHE", str(tmp_path))
    monkeypatch.setattr(G, "_choice", None)
    calls = []
    fake = {"small": {"int_mm": 10.0, "float32": 11.0, "int16": 30.0}, "large": {"int_mm": 100.0, "float32": 119.0}}
    monkeypatch.setattr(G, "measure", lambda **kw: calls.append(kw) or fake)
    c = G.choice()
    assert (c["small"], c["large"]) == ("int16", "int_mm")  # 1.19x is not enough to leave _int_mm
    assert c["measured_now"] and len(calls) == 1
    files = list((tmp_path / "int8_gemm").glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["large"] == "int_mm"
    monkeypatch.setattr(G, "_choice", None)
    assert G.choice()["measured_now"] is False and len(calls) == 1  # read back, not measured again
    for damage in (b"", b"{not json", json.dumps({"small": "warp-drive"}).encode(), files[0].read_bytes()[:40]):
        files[0].write_bytes(damage)
        monkeypatch.setattr(G, "_choice", None)
        c = G.choice()
        assert c["measured_now"] and (c["small"], c["large"]) == ("int16", "int_mm")
        assert "was damaged" in capsys.readouterr().err
    assert len(calls) == 5


def test_inexact_never_chosen(monkeypatch, tmp_path):
    monkeypatch.delenv(G.ENV, raising=False)
    monkeypatch.setenv("OUTLIERS_CACHE", str(tmp_path))
    monkeypatch.setattr(G, "_choice", None)
    monkeypatch.setattr(G, "_verify_results", {"int_mm": False, "float32": True, "int16": True})
    seen = []
    monkeypatch.setattr(
        G, "measure", lambda names, **kw: seen.append(names) or {c: {n: 1.0 for n in names} for c in ("small", "large")}
    )
    c = G.choice()
    assert seen == [["float32", "int16"]] and "int_mm" not in (c["small"], c["large"])
    monkeypatch.setenv(G.ENV, "int_mm")
    with pytest.raises(InvalidArgumentError, match="'int_mm' is not exact on this machine"):
        G.selected()


def test_a_saturating_kernel_fails_verification(monkeypatch):
    # what vpmaddubsw-style u8 x s8 kernels do: pair sums clamped to int16
    def saturating(a, b):
        p = a.long()[:, None, :] * b.long()[None, :, :]
        k = p.shape[-1] - p.shape[-1] % 2
        pairs = (p[..., :k:2] + p[..., 1:k:2]).clamp(-32768, 32767)
        return (pairs.sum(-1) + p[..., k:].sum(-1)).to(torch.int32)

    monkeypatch.setitem(G.BACKENDS, "sat", G.Backend("sat", saturating, "saturating", "none"))
    monkeypatch.setattr(G, "_verify_results", {})
    assert G.verify("sat") is False and G.verify("float32") is True


def test_int8_matmul_goes_through_the_choice(monkeypatch):
    seen = []
    real = G.BACKENDS["float32"]
    monkeypatch.setitem(
        G.BACKENDS, "float32", G.Backend("float32", lambda a, b: seen.append(a.shape) or real.fn(a, b), "", "")
    )
    monkeypatch.setenv(G.ENV, "float32")
    monkeypatch.setitem(G._verify_results, "float32", True)  # checked already: seen counts this product alone
    a, b = _operands(5, 33, 7)
    assert torch.equal(int8_matmul(a, b).long(), _ref(a, b)) and seen == [(5, 33)]


def test_machine_facts_name_the_cpu_and_threads():
    f = G.machine_facts()
    assert f["cpu"] and f["threads"] == torch.get_num_threads() and f["torch"] == torch.__version__
